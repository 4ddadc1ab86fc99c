"""FedSRD's options beyond the paper: damped solves, client and server error feedback, unbiased
importance sampling, rebalancing after catch-ups, diagnostics, and their memory in checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedlowrank.algorithms import ClientInfo, RoundInfo, make_algorithm
from fedlowrank.algorithms.fedsrd import solve_inverse
from fedlowrank.algorithms.upload import UploadConfig, sparse_upload
from fedlowrank.config import ConfigError
from fedlowrank.payload import Payload
from fedlowrank.runconfig import parse_run_config
from fedlowrank.sim import Channel, SimConfig, Simulation
from fedlowrank.runs.experiment import run_experiment
from fedlowrank.runs.rundir import RunDir
from fedlowrank.sparsify import importance_sample, keep_count, sampling_probabilities
from fedlowrank.tasks import make_task

D = torch.float64  # the math tests run in float64


def lora_state(gen, d_out=6, d_in=5, r=2, scale=1.0):
    return {
        "m.lora_A": scale * torch.randn(r, d_in, generator=gen, dtype=D),
        "m.lora_B": scale * torch.randn(d_out, r, generator=gen, dtype=D),
        "head": torch.randn(3, generator=gen, dtype=D),
    }


# --- damped solves ----------------------------------------------------------------------------
def test_truncated_and_tikhonov_equal_pinv_on_well_conditioned_factors():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 4, generator=gen, dtype=D))
    A = (Q * torch.tensor([2.0, 1.5, 1.2, 1.0], dtype=D)).mT  # (4, 40), cond 2
    exact = torch.linalg.pinv(A)
    torch.testing.assert_close(solve_inverse(A, "truncated", 0.05), exact, rtol=1e-12, atol=1e-12)
    # Tikhonov: relative difference (tol s_max / s_min)^2 = (0.05 * 2)^2 = 1e-2 at most
    err = torch.linalg.matrix_norm(solve_inverse(A, "tikhonov", 0.05) - exact) / torch.linalg.matrix_norm(exact)
    assert 0 < err < 1.1e-2
    torch.testing.assert_close(solve_inverse(A, "pinv"), exact)


@settings(max_examples=40, deadline=None)
@given(short=st.integers(2, 30), long=st.integers(31, 60), tall=st.booleans(), log_cond=st.floats(0.0, 14.0),
       seed=st.integers(0, 99), solve=st.sampled_from(["pinv", "truncated", "tikhonov"]),
       dtype=st.sampled_from([torch.float32, D]))  # fmt: skip
def test_a_given_svd_gives_the_same_inverse(short, long, tall, log_cond, seed, solve, dtype):
    """solve_inverse(M, svd=...) equals the inverse it computes itself, to rounding, for every
    solve, tall (B) and wide (A) factors, with torch's SVD and with the QR-based one the
    sketched step hands over (ProductSketch.factor_svd): pinv keeps torch's cut-off, so a
    direction pinv drops (cond up to 1e14, beyond float32's) is dropped with the SVD given too."""
    gen = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(long, short, generator=gen, dtype=D))
    Q2, _ = torch.linalg.qr(torch.randn(short, short, generator=gen, dtype=D))
    s = torch.logspace(0, -log_cond, short, dtype=D)
    M = ((Q2 * s) @ Q1.mT).to(dtype)  # (short, long), s_max / s_min = 10^log_cond
    if tall:
        M = M.mT.contiguous()
    want = solve_inverse(M, solve, 1e-3)
    S = torch.linalg.svdvals(M)
    eps = torch.finfo(dtype).eps
    if solve == "pinv":  # a singular value within rounding of pinv's cut-off may land on either side
        cut = max(M.shape) * eps * float(S[0])
        if bool(((S > cut / 2) & (S < cut * 2)).any()):
            return
    bound = 1e3 * eps * float(torch.linalg.matrix_norm(want, ord=2)) ** 2 * float(torch.linalg.matrix_norm(M, ord=2))
    svds = [torch.linalg.svd(M, full_matrices=False)]
    B, A = (M, torch.ones(short, 3, dtype=dtype)) if tall else (torch.ones(3, short, dtype=dtype), M)
    from fedlowrank.sketch import ProductSketch

    sk = ProductSketch(B, A, seed=0, sides="left" if tall else "right")
    if (given := sk.factor_svd("B" if tall else "A")) is not None:
        svds.append(given)
    for svd in svds:
        got = solve_inverse(M, solve, 1e-3, svd=svd)
        assert float(torch.linalg.matrix_norm(got - want, ord=2)) <= bound


def test_pinv_with_a_given_svd_drops_what_pinv_drops_not_less():
    """A singular value between min(shape) * eps * s_max and max(shape) * eps * s_max: torch's
    pinv drops it (its cut-off uses the larger dimension), so the given-SVD path must too."""
    gen = torch.Generator().manual_seed(3)
    Q1, _ = torch.linalg.qr(torch.randn(400, 4, generator=gen, dtype=D))
    Q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=D))
    eps = torch.finfo(D).eps
    s = torch.tensor([1.0, 0.5, 0.2, 20 * eps], dtype=D)  # 4 eps < 20 eps < 400 eps
    M = (Q2 * s) @ Q1.mT  # (4, 400)
    want = torch.linalg.pinv(M)
    got = solve_inverse(M, "pinv", svd=torch.linalg.svd(M, full_matrices=False))
    assert float(torch.linalg.matrix_norm(want, ord=2)) < 10  # the tiny direction was dropped
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_damped_solves_stay_bounded_on_singular_factors():
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(30, 3, generator=gen, dtype=D))
    A = (Q * torch.tensor([1.0, 1e-3, 1e-9], dtype=D)).mT  # nearly singular
    tol = 0.05
    assert torch.linalg.matrix_norm(torch.linalg.pinv(A), ord=2) > 1e8  # the paper's solve explodes
    for solve, bound in (("truncated", 1 / tol), ("tikhonov", 1 / (2 * tol))):
        assert torch.linalg.matrix_norm(solve_inverse(A, solve, tol), ord=2) <= bound * (1 + 1e-9), solve
    assert torch.equal(solve_inverse(torch.zeros(3, 30, dtype=D), "tikhonov", tol), torch.zeros(30, 3))


def test_bad_solve_option_is_named():
    with pytest.raises(ConfigError, match="solve"):
        make_algorithm("fedsrd", {"solve": "lstsq"})
    with pytest.raises(ConfigError, match="solve_tol"):
        make_algorithm("fedsrd", {"solve_tol": 2.0})
    with pytest.raises(ConfigError, match="upload_mask"):
        make_algorithm("fedavg", {"upload_mask": "topk"})


# --- importance sampling ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=2, max_size=60), st.integers(1, 60))
@example([1.0, 1.0, 5e-324, 5e-324], 3)  # subnormal scores: the scale 1 / suffix overflowed
def test_sampling_probabilities_sum_to_k_and_are_capped(scores, k):
    s = torch.tensor(scores, dtype=D)
    k = min(k, len(scores))
    p = sampling_probabilities(s, k)
    assert ((p >= 0) & (p <= 1 + 1e-12)).all()
    assert torch.all(p[s == 0] == 0)
    positive = int((s > 0).sum())
    assert float(p.sum()) == pytest.approx(min(k, positive), rel=1e-9, abs=1e-9)
    order = torch.argsort(s)  # monotone in the score
    assert torch.all(torch.diff(p[order]) >= -1e-12)


def test_importance_sampling_is_unbiased_over_seeds():
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(8, 6, generator=gen, dtype=D)
    scores = delta.abs() * torch.rand(8, 6, generator=gen, dtype=D)
    k = keep_count(delta.numel(), 0.8)
    draws = torch.stack([importance_sample(delta, scores, k, seed) for seed in range(20000)])
    counts = (draws != 0).sum(dim=(1, 2)).double()
    assert float(counts.mean()) == pytest.approx(k, rel=0.02)
    p = sampling_probabilities(scores, k)
    # the standard error of each entry's mean is |d| sqrt((1 - p) / p) / sqrt(N)
    se = delta.abs() * ((1 - p) / p).sqrt() / math.sqrt(draws.shape[0])
    assert torch.all((draws.mean(0) - delta).abs() <= 5 * se + 1e-12)


# --- client error feedback --------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["importance", "magnitude", "random", "importance-sampled"])
def test_upload_feedback_telescopes(mask):
    """sent_1 + ... + sent_T + final remainder = the sum of the true deltas, exactly in float64."""
    gen = torch.Generator().manual_seed(3)
    cfg = UploadConfig(upload_mask=mask, upload_feedback=True)
    keys = ["m.lora_A", "m.lora_B", "head"]
    start = lora_state(gen)
    memory: dict = {}
    sent_sum = {k: torch.zeros_like(start[k]) for k in keys}
    true_sum = {k: torch.zeros_like(start[k]) for k in keys}
    for t in range(1, 8):
        trained = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=D) for k, v in start.items()}
        payload, memory = sparse_upload(start, trained, keys, cfg, ClientInfo(t, 0, 0), memory)
        for k in keys:
            sent_sum[k] += payload.tensors[k]
            true_sum[k] += trained[k] - start[k]
        assert 0 < payload.stats["upload_kept_energy"] <= 1
        start = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=D) for k, v in start.items()}
    for k in keys:
        torch.testing.assert_close(sent_sum[k] + memory[k], true_sum[k], rtol=0, atol=1e-12)
    assert any(float(memory[k].abs().sum()) > 0 for k in ("m.lora_A", "m.lora_B"))


def test_without_feedback_no_memory_is_kept():
    gen = torch.Generator().manual_seed(4)
    s = lora_state(gen)
    t = {k: v + 1 for k, v in s.items()}
    payload, memory = sparse_upload(s, t, list(s), UploadConfig(upload_mask="importance"), ClientInfo(1, 0, 0), {})
    assert memory == {} and payload.stats["upload_kept_energy"] < 1


# --- server error feedback --------------------------------------------------------------------
@pytest.mark.parametrize("efficient", [False, True])
def test_download_feedback_keeps_what_the_broadcast_did_not_realise(efficient):
    """Per round: (B'A' - BA) + E_new = T + E_old, where T is the server's target and E the carried
    residual (exact here: the residual's rank fits within the kept 2r)."""
    gen = torch.Generator().manual_seed(5)
    alg = make_algorithm("fedsrd", {"efficient": efficient, "download_feedback": True,
                                    "download_rescale": False, "upload_mask": "none"})  # fmt: skip
    state = lora_state(gen, d_out=3, d_in=4, r=2)  # residual rank <= 3 <= 2r
    memory: dict = {}
    for t in range(1, 6):
        uploads = [Payload({k: 0.2 * torch.randn(v.shape, generator=gen, dtype=D) for k, v in state.items()}) for _ in range(3)]
        B, A = state["m.lora_B"], state["m.lora_A"]
        Bs = [B + u.tensors["m.lora_B"] for u in uploads]
        As = [A + u.tensors["m.lora_A"] for u in uploads]
        W = sum(b @ a for b, a in zip(Bs, As)) / 3
        if efficient:
            T = W - B @ A
        else:
            U, S, Vh = torch.linalg.svd(W)
            T = (U[:, :2] * S[:2]) @ Vh[:2] - B @ A
        E_old = memory["m.download_feedback_L"] @ memory["m.download_feedback_R"] if memory else torch.zeros_like(T)
        bc, memory = alg.server_step(state, uploads, [1, 1, 1], RoundInfo(t, 0), memory)
        new = alg.apply_broadcast(state, bc)
        E_new = memory["m.download_feedback_L"] @ memory["m.download_feedback_R"]
        torch.testing.assert_close(new["m.lora_B"] @ new["m.lora_A"] - B @ A + E_new, T + E_old, rtol=1e-9, atol=1e-9)
        assert 0 < bc.stats["realisation_error"]
        state = new


def test_download_feedback_needs_the_server_step():
    alg = make_algorithm("fedsrd", {"download_feedback": True})
    gen = torch.Generator().manual_seed(6)
    s = lora_state(gen)
    with pytest.raises(ValueError, match="server_step"):
        alg.server_broadcast(s, [Payload({k: torch.zeros_like(v) for k, v in s.items()})], [1], RoundInfo(1, 0))


# --- the runtime: catch-ups, diagnostics, memory in checkpoints --------------------------------
def digits(**kw):
    opts = {"num_clients": 10, "local_steps": 5, "lr": 0.05, "min_samples": 4, **kw}
    return make_task("digits", opts, seed=0)


@pytest.mark.parametrize("name", ["fedsrd", "fedsrd-plus"])
def test_rebalance_stays_in_sync_through_full_state_catch_ups(name):
    alg = make_algorithm(name, {"rebalance": True})
    cfg = SimConfig(rounds=12, fraction=0.3, verify_sync=True)  # raises on any drift
    records = Simulation(digits(), alg, cfg, seed=0).run()
    assert any(c["catchup"] == "state" for r in records for c in r["per_client"])
    assert all(r["accepted"] == 3 for r in records)


def test_rounds_record_fedsrd_diagnostics():
    records = Simulation(digits(), make_algorithm("fedsrd"), SimConfig(rounds=3, fraction=0.5), seed=0).run()
    for r in records:
        d = r["diagnostics"]
        for key in ("B_norm_max", "A_norm_max", "solve_cond_max", "step_rel_max", "download_kept_energy",
                    "realisation_error", "upload_kept_energy", "B_norm_after_max", "A_norm_after_max"):  # fmt: skip
            assert math.isfinite(d[key]) and d[key] >= 0, key
        assert 0 < d["upload_kept_energy"] < 1 and 0 < d["download_kept_energy"] < 1
        assert all("upload_kept_energy" in c for c in r["per_client"])
    assert records[0]["diagnostics"]["B_norm_max"] == 0.0  # B starts at zero
    off = make_algorithm("fedsrd", {"diagnostics": False})
    r = Simulation(digits(), off, SimConfig(rounds=1, fraction=0.5), seed=0).run()[0]
    assert "realisation_error" not in r["diagnostics"] and "upload_kept_energy" in r["diagnostics"]


def test_memories_are_checkpointed_and_resume_is_bit_identical(tmp_path):
    raw = {"name": "ef", "algorithms": ["fedsrd-ef"], "task": {"name": "digits", "num_clients": 6},
           "sim": {"rounds": 6, "fraction": 0.5, "eval_every": 2},
           "algorithm": {"fedsrd-ef": {"base": "fedsrd-plus", "download_feedback": True, "upload_feedback": True}}}  # fmt: skip
    cfg = parse_run_config(raw)

    class Interrupt(Channel):
        def upload(self, round, client, data):
            if round == 4:
                raise KeyboardInterrupt
            return data

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "a", channel=Interrupt())
    state, _ = RunDir(tmp_path / "a").load_checkpoint()
    assert state.round == 3 and state.client_memory and state.server_memory
    run_experiment(cfg, tmp_path / "a", resume=True)
    run_experiment(cfg, tmp_path / "b")
    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "per_client"} for r in rs]  # noqa: E731
    assert strip(a.read_metrics()) == strip(b.read_metrics())
    sa, sb = a.load_checkpoint()[0], b.load_checkpoint()[0]
    for part in ("global_state", "server_memory"):
        for k, v in getattr(sa, part).items():
            assert torch.equal(v, getattr(sb, part)[k]), (part, k)
    assert sa.client_memory.keys() == sb.client_memory.keys()
    for i, mem in sa.client_memory.items():
        assert all(torch.equal(v, sb.client_memory[i][k]) for k, v in mem.items())


def test_random_upload_masks_lora_factors_and_leaves_a_head_dense():
    gen = torch.Generator().manual_seed(7)
    s = lora_state(gen, d_out=20, d_in=20, r=4)
    t = {k: v + torch.randn(v.shape, generator=gen, dtype=D) for k, v in s.items()}
    cfg = UploadConfig(upload_mask="random", upload_sparsity=0.9)
    payload, _ = sparse_upload(s, t, list(s), cfg, ClientInfo(1, 0, 0), {})
    assert torch.equal(payload.tensors["head"], t["head"] - s["head"]) and "head" not in payload.seeds
    assert float((payload.tensors["m.lora_A"] != 0).double().mean()) < 0.3 and "m.lora_A" in payload.seeds
    plain = {"w": s["head"]}  # no LoRA factors (full fine-tuning): every key is masked
    payload, _ = sparse_upload(plain, {"w": t["head"]}, ["w"], cfg, ClientInfo(1, 0, 0), {})
    assert "w" in payload.seeds
