"""Streaming aggregation and the sketched FedSRD / FlexLoRA server step (issue 14).

* the sketch equals the exact aggregate when its width covers E's rank, and is exact on
  everything the deltas do inside the spans of the global factors;
* the sketched FedSRD / FedSRD-e / FlexLoRA steps match the exact ones (float64);
* streaming FedAvg equals the batch mean bit for bit, and every registered algorithm's
  aggregator equals its batch `server_step`;
* aggregating 200 uploads of a mid-sized adapter stays under a fixed memory bound;
* 1,000 clients with 100 per round run through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlowrank.algorithms import ALGORITHMS, make_algorithm
from fedlowrank.algorithms.aggregation import aggregate, aggregate_encoded
from fedlowrank.algorithms.base import RoundInfo, aggregation_weights, weighted_mean
from fedlowrank.algorithms.fedsrd import target
from fedlowrank.cli import main
from fedlowrank.codec import DecodeBuffers, decode_payload, encode_payload
from fedlowrank.lora import truncated_svd_of_sum
from fedlowrank.payload import Payload
from fedlowrank.sketch import ProductSketch

D64 = torch.float64


def module(d_out, d_in, r, m, seed, spread=0.1, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=dtype) / d_in**0.5
    B = 0.02 * torch.randn(d_out, r, generator=g, dtype=dtype)
    dBs = [spread * B.std() * torch.randn(d_out, r, generator=g, dtype=dtype) for _ in range(m)]
    dAs = [spread * A.std() * torch.randn(r, d_in, generator=g, dtype=dtype) for _ in range(m)]
    return B, A, dBs, dAs


def exact_W(B, A, dBs, dAs, w):
    return sum(wi * (B + dB) @ (A + dA) for wi, dB, dA in zip(w, dBs, dAs))


def rel(x, y):
    return float((x - y).norm() / y.norm())


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(6, 40), d_in=st.integers(6, 40), r=st.integers(1, 3), m=st.integers(1, 4), seed=st.integers(0, 99))
def test_sketch_is_exact_when_its_width_covers_the_rank(d_out, d_in, r, m, seed):
    B, A, dBs, dAs = module(d_out, d_in, r, m, seed, spread=1.0)
    w = [1.0 / m] * m
    sk = ProductSketch(B, A, seed=seed, width=m * r)
    for dB, dA, wi in zip(dBs, dAs, w):
        sk.add(dB, dA, wi)
    L, R = sk.factors()
    W = exact_W(B, A, dBs, dAs, w)
    assert rel(L @ R, W) < 1e-8
    L, R = sk.factors(difference=True)
    assert rel(L @ R, W - B @ A) < 1e-8


@settings(max_examples=25, deadline=None)
@given(d=st.integers(8, 40), r=st.integers(1, 4), m=st.integers(1, 6), seed=st.integers(0, 99))
def test_cross_approximation_is_exact_inside_the_factor_spans(d, r, m, seed):
    """Deltas dB_i in range(B) (or dA_i in A's row space) put E inside the spans: width 0 is exact."""
    B, A, dBs, dAs = module(d + 5, d, r, m, seed, spread=1.0)
    g = torch.Generator().manual_seed(seed)
    for in_span_B in (True, False):
        if in_span_B:
            dBs2 = [B @ torch.randn(r, r, generator=g, dtype=D64) for _ in range(m)]
            dAs2 = dAs
        else:
            dBs2 = dBs
            dAs2 = [torch.randn(r, r, generator=g, dtype=D64) @ A for _ in range(m)]
        w = [1.0 / m] * m
        sk = ProductSketch(B, A, seed=seed, width=0)
        for dB, dA, wi in zip(dBs2, dAs2, w):
            sk.add(dB, dA, wi)
        L, R = sk.factors()
        assert rel(L @ R, exact_W(B, A, dBs2, dAs2, w)) < 1e-8


@settings(max_examples=30, deadline=None)
@given(d_out=st.integers(4, 40), d_in=st.integers(4, 40), r=st.integers(1, 4), m=st.integers(1, 4),
       seed=st.integers(0, 99), zero_b=st.booleans(), sides=st.sampled_from(["both", "right", "left"]),
       width=st.sampled_from([0, 3]))
def test_the_sketchs_own_truncated_svd_equals_the_generic_one(d_out, d_in, r, m, seed, zero_b, sides, width):
    """ProductSketch.truncated_svd reuses the QRs of B and A^T; the product it gives is the
    rank-r SVD of factors()'s product, as truncated_svd_of_sum computes it (float64), B = 0 too."""
    B, A, dBs, dAs = module(d_out, d_in, r, m, seed, spread=1.0)
    if zero_b:
        B = torch.zeros_like(B)
    sk = ProductSketch(B, A, seed=seed, sides=sides if not width else "both", width=width)
    for dB, dA in zip(dBs, dAs):
        sk.add(dB, dA, 1.0 / m)
    L, R = sk.factors()
    want_L, want_R = truncated_svd_of_sum([L], [R], [1.0], r)
    got_L, got_R = sk.truncated_svd(r)
    assert got_L.shape == want_L.shape and got_R.shape == want_R.shape
    want = want_L @ want_R
    scale = max(float((L @ R).norm()), 1e-300)
    assert float((got_L @ got_R - want).norm()) <= 1e-9 * scale


@pytest.mark.parametrize("sides", ["both", "right", "left"])
def test_the_sketch_hands_out_the_factor_svd_it_took_only_when_every_direction_was_kept(sides):
    """factor_svd gives what the sketch's bases came from, for the solve to reuse: B = U S Vh
    (and A likewise) for a side it streams; None for a side it does not, or a rank-deficient
    factor (LoRA's B = 0 at the start), whose thin SVD dropped directions a pinv would keep."""
    B, A, _, _ = module(30, 20, 3, 1, 0)
    sk = ProductSketch(B, A, seed=0, sides=sides)
    for which, M, streamed in (("B", B, sides != "right"), ("A", A, sides != "left")):
        svd = sk.factor_svd(which)
        if not streamed:
            assert svd is None
            continue
        U, S, Vh = svd
        assert S.numel() == 3 and U.dtype == S.dtype == Vh.dtype == M.dtype
        assert bool((S[:-1] >= S[1:]).all())
        torch.testing.assert_close(U.mT @ U, torch.eye(3, dtype=D64), rtol=0, atol=1e-12)
        torch.testing.assert_close(Vh @ Vh.mT, torch.eye(3, dtype=D64), rtol=0, atol=1e-12)
        torch.testing.assert_close((U * S) @ Vh, M, rtol=1e-12, atol=1e-14)
    for deficient in (torch.zeros_like(B), B[:, [0, 0, 1]]):  # LoRA's B = 0; a repeated column
        sk_d = ProductSketch(deficient, A, seed=0, sides=sides)
        assert sk_d.factor_svd("B") is None
    sk32 = ProductSketch(B.float(), A.float(), seed=0, sides=sides)
    for which in ("B", "A"):
        got = sk32.factor_svd(which)
        assert got is None or all(t.dtype == torch.float32 for t in got)
    with pytest.raises(ValueError, match="'B' or 'A'"):
        sk.factor_svd("C")


def test_sketch_is_deterministic_and_its_error_estimate_tracks_the_truth():
    B, A, dBs, dAs = module(300, 200, 8, 20, 0, spread=0.3)
    w = [1.0 / 20] * 20
    outs = []
    for _ in range(2):
        sk = ProductSketch(B, A, seed=5, width=0)
        for dB, dA, wi in zip(dBs, dAs, w):
            sk.add(dB, dA, wi)
        L, R = sk.factors()
        left, right = truncated_svd_of_sum([L], [R], [1.0], 8)
        outs.append((left @ right, sk.first_order_error(left, right)))
    assert torch.equal(outs[0][0], outs[1][0])
    L, R = target(B, A, [B + x for x in dBs], [A + x for x in dAs], w, efficient=False)
    true_err = rel(outs[0][0] - B @ A, L @ R)
    est = outs[0][1]
    assert 0 < true_err < 0.05
    assert true_err / 3 < est < true_err * 3, (true_err, est)
    # the caller's ||left right - B A||^2 (the step has it for its diagnostics) gives the same
    Ls, Rs = sk.factors()
    left, right = truncated_svd_of_sum([Ls], [Rs], [1.0], 8)
    t2 = float((left @ right - B @ A).pow(2).sum())
    assert sk.first_order_error(left, right, t2) == pytest.approx(est, rel=1e-9)


def _solved(B, A, T):
    """The Eq. 12-13 solves of a dense target: (T pinv(A), pinv(B) T)."""
    return T @ torch.linalg.pinv(A), torch.linalg.pinv(B) @ T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_one_sided_sketch_solves_as_well_as_the_two_sided_one(seed):
    """sides = "right" (E V only) gives the odd solve T pinv(A) to the two-sided sketch's
    accuracy, "left" (U^T E only) the even solve pinv(B) T, though each gets the whole target
    less well; the one-sided error estimate tracks the solved factor's true error."""
    B, A, dBs, dAs = module(300, 200, 8, 20, seed, spread=0.3)
    w = [1.0 / 20] * 20
    L, R = target(B, A, [B + x for x in dBs], [A + x for x in dAs], w, efficient=False)
    T = L @ R
    exact_dB, exact_dA = _solved(B, A, T)
    got = {}
    for sides in ("both", "right", "left"):
        sk = ProductSketch(B, A, seed=5, sides=sides)
        for dB, dA, wi in zip(dBs, dAs, w):
            sk.add(dB, dA, wi)
        left, right = truncated_svd_of_sum(*[[x] for x in sk.factors()], [1.0], 8)
        Ts = left @ right - B @ A
        dB_s, dA_s = _solved(B, A, Ts)
        got[sides] = (rel(Ts, T), rel(dB_s, exact_dB), rel(dA_s, exact_dA), sk.first_order_error(left, right))
    t_both, dB_both, dA_both, _ = got["both"]
    assert dB_both < 2e-2 and dA_both < 2e-2
    t_right, dB_right, _, est_right = got["right"]
    t_left, _, dA_left, est_left = got["left"]
    assert dB_right < 1.5 * dB_both and dA_left < 1.5 * dA_both, got
    assert t_right > 3 * t_both and t_left > 3 * t_both, got  # the other side is first-order wrong
    assert dB_right / 3 < est_right < 3 * dB_right, got
    assert dA_left / 3 < est_left < 3 * dA_left, got


def test_sketch_sides_is_checked_and_auto_streams_both_sides_for_download_feedback():
    with pytest.raises(ValueError, match="sketch_sides"):
        make_algorithm("fedsrd", {"sketch_sides": "solve", "download_feedback": True, "download_rescale": False})
    with pytest.raises(ValueError, match="sketch_width"):
        make_algorithm("fedsrd", {"sketch_sides": "solve", "sketch_width": 4})
    with pytest.raises(ValueError, match="sketch_sides"):
        make_algorithm("fedsrd", {"sketch_sides": "left"})
    with pytest.raises(ValueError, match="sides"):
        ProductSketch(torch.zeros(4, 2), torch.zeros(2, 3), seed=0, sides="solve")
    glob = lora_state(1, 20, 10, 4, 0, head=False)
    ups = uploads_for(glob, 3, 0)
    for options, one_side in (({}, 1.0), ({"download_feedback": True, "download_rescale": False}, 0.0)):
        alg = make_algorithm("fedsrd", {"method": "sketch", **options})
        got = alg.server_step(glob, ups, [1, 1, 1], RoundInfo(1, 0), {})[0]
        assert got.stats["sketch_one_side"] == one_side, options


def lora_state(modules, d_out, d_in, r, seed, head=True):
    g = torch.Generator().manual_seed(seed)
    s = {}
    for j in range(modules):
        s[f"m{j}.lora_A.weight"] = torch.randn(r, d_in, generator=g) / d_in**0.5
        s[f"m{j}.lora_B.weight"] = 0.02 * torch.randn(d_out, r, generator=g)
    if head:
        s["head.weight"] = torch.randn(3, d_out, generator=g)
    return s


def uploads_for(state, m, seed, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    return [Payload({k: spread * v.std() * torch.randn(v.shape, generator=g) for k, v in state.items()},
                    meta={"kind": "delta", "round": 1, "client": i}) for i in range(m)]  # fmt: skip


def as64(state):
    return {k: v.double() for k, v in state.items()}


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("round_", [1, 2])
def test_sketched_fedsrd_step_matches_the_exact_one(efficient, round_):
    glob = as64(lora_state(2, 40, 30, 3, 0))
    ups = [Payload({k: v.double() for k, v in u.tensors.items()}, meta=u.meta) for u in uploads_for(glob, 5, 1)]
    counts = [10, 20, 30, 40, 50]
    info = RoundInfo(round_, seed=7)
    base = {"efficient": efficient, "server_dtype": "float64", "weighting": "samples"}
    exact = make_algorithm("fedsrd", {**base, "method": "factored"}).server_step(glob, ups, counts, info, {})[0]
    # width covering the rank: equal to the exact step; width 0: FedSRD-e's solve is exact anyway,
    # with both sides streamed or only the one its solve reads
    for width, sides, tol in ((15, "auto", 1e-8), (0, "both", 1e-8 if efficient else 2e-2),
                              (0, "solve", 1e-8 if efficient else 2e-2)):  # fmt: skip
        alg = make_algorithm("fedsrd", {**base, "method": "sketch", "sketch_width": width, "sketch_sides": sides})
        got = alg.server_step(glob, ups, counts, info, {})[0]
        assert got.stats["sketched"] == 1.0
        assert got.stats["sketch_one_side"] == (1.0 if sides == "solve" else 0.0)
        assert set(got.tensors) == set(exact.tensors)
        for k in exact.tensors:
            if exact.tensors[k].norm() > 0:
                assert rel(got.tensors[k], exact.tensors[k]) < tol, (k, width)
        assert torch.equal(got.tensors["head.weight"], exact.tensors["head.weight"])
        assert got.seeds == exact.seeds


@pytest.mark.parametrize("options", [{"download_feedback": True}, {"solve": "tikhonov", "solve_tol": 1e-2},
                                     {"efficient": True}, {}])  # fmt: skip
def test_the_sketched_steps_reused_svd_and_norm_give_the_stats_a_fresh_solve_gives(monkeypatch, options):
    """The sketched step hands the solve its factor's SVD and ||T||^2 (the diagnostics and the
    estimate share it); over three rounds (download feedback's memory carried, which adds
    columns to the target and so needs ||T||^2 anew) the broadcast and every diagnostic equal
    those of the same step computing both itself."""
    import fedlowrank.algorithms.fedsrd as fedsrd

    glob = as64(lora_state(2, 40, 30, 3, 0))
    alg = make_algorithm("fedsrd", {"server_dtype": "float64", "method": "sketch", **options})

    def rounds():
        state, memory, out = dict(glob), {}, []
        for rnd in (1, 2, 3):
            ups = [Payload({k: v.double() for k, v in u.tensors.items()}, meta=u.meta) for u in uploads_for(state, 5, rnd)]
            bc, memory = alg.server_step(state, ups, [1] * 5, RoundInfo(rnd, seed=7), memory)
            out.append(bc)
            state = alg.apply_broadcast(state, bc)
        return out

    reused = rounds()
    fresh_module = fedsrd._Step.module
    monkeypatch.setattr(fedsrd._Step, "module", lambda self, module, B, A, L, R, factor_svd=None, target2=None:
                        fresh_module(self, module, B, A, L, R))  # fmt: skip
    fresh = rounds()
    for a, b in zip(reused, fresh, strict=True):
        assert set(a.tensors) == set(b.tensors)
        for k in a.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-9, atol=1e-12)
        assert set(a.stats) == set(b.stats)
        for k in a.stats:
            assert a.stats[k] == pytest.approx(b.stats[k], rel=1e-6, abs=1e-12), k


def test_auto_method_switches_where_the_exact_step_stops_being_cheap(monkeypatch):
    import fedlowrank.algorithms.aggregation as agg

    glob = lora_state(1, 20, 10, 4, 0, head=False)
    alg = make_algorithm("fedsrd", {"sketch_above": 8})
    info = RoundInfo(1, 0)
    # a 20 x 10 module: the exact step is cheap at any m, so auto keeps it
    assert "sketched" not in alg.server_step(glob, uploads_for(glob, 3, 0), [1, 1, 1], info, {})[0].stats
    monkeypatch.setattr(agg, "EXACT_WORK", 100)  # as if the module were large
    two = alg.server_step(glob, uploads_for(glob, 2, 0), [1, 1], info, {})[0]  # 2 x 4 = 8: exact
    three = alg.server_step(glob, uploads_for(glob, 3, 0), [1, 1, 1], info, {})[0]  # 12 > 8: sketch
    assert "sketched" not in two.stats and three.stats["sketched"] == 1.0
    assert 0.0 <= three.stats["sketch_error_max"] < 1.0
    # Llama-3.2-3B's gate module at r = 64: exact up to 16 clients, the sketch from 32
    big = {"g.lora_A.weight": torch.zeros(64, 3072), "g.lora_B.weight": torch.zeros(8192, 64)}
    monkeypatch.setattr(agg, "EXACT_WORK", 2**34)
    fedsrd = make_algorithm("fedsrd")
    assert [fedsrd.sketched(big, m) for m in (4, 8, 16, 32, 128)] == [False, False, False, True, True]


def test_sketched_flexlora_matches_the_exact_product():
    glob = as64(lora_state(2, 30, 20, 3, 2))
    ups = [Payload({k: v.double() for k, v in u.tensors.items()}, meta=u.meta) for u in uploads_for(glob, 4, 3)]
    info = RoundInfo(3, 1)
    exact = make_algorithm("flexlora", {"method": "factored"}).server_broadcast(glob, ups, [1, 2, 3, 4], info)
    got = make_algorithm("flexlora", {"method": "sketch", "sketch_width": 12}).server_broadcast(glob, ups, [1, 2, 3, 4], info)
    for j in range(2):
        b, a = f"m{j}.lora_B.weight", f"m{j}.lora_A.weight"
        assert rel(got.tensors[b] @ got.tensors[a], exact.tensors[b] @ exact.tensors[a]) < 1e-8
    assert rel(got.tensors["head.weight"], exact.tensors["head.weight"]) < 1e-12


def test_streaming_fedavg_equals_the_batch_mean_bit_for_bit():
    glob = lora_state(3, 16, 12, 2, 0)
    ups = uploads_for(glob, 7, 4)
    counts = [3, 1, 4, 1, 5, 9, 2]
    for weighting in ("uniform", "samples"):
        alg = make_algorithm("fedavg", {"weighting": weighting})
        got = aggregate(alg.aggregator(glob, counts, RoundInfo(1, 0), {}), iter(ups))[0]
        w = aggregation_weights(counts, weighting)
        for k in glob:
            assert torch.equal(got.tensors[k], weighted_mean([u.tensors[k] for u in ups], w))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithms_aggregator_equals_its_batch_step(name):
    """The runtimes feed `aggregator`; tests and users may call `server_step`: the same bits."""
    alg = make_algorithm(name)
    glob = alg.init_state(lora_state(2, 12, 10, 2, 0), 0)
    sent = alg.sent_keys(glob)
    ups = [Payload({k: v for k, v in u.tensors.items() if k in sent}, meta=u.meta) for u in uploads_for(glob, 3, 1)]
    info = RoundInfo(2, 3)
    batch, mem_b = alg.server_step(glob, ups, [5, 6, 7], info, {})
    stream, mem_s = aggregate(alg.aggregator(glob, [5, 6, 7], info, {}), iter(ups))
    assert batch.tensors.keys() == stream.tensors.keys()
    for k in batch.tensors:
        assert torch.equal(batch.tensors[k], stream.tensors[k]), k
    assert batch.meta == stream.meta and batch.seeds == stream.seeds
    assert mem_b.keys() == mem_s.keys()


@pytest.mark.parametrize("name, options", [*((n, {}) for n in sorted(ALGORITHMS)),
                                           ("fedsrd", {"method": "sketch"}), ("flexlora", {"method": "sketch"})])
def test_an_aggregator_that_lets_uploads_go_is_fed_reused_buffers_safely(name, options):
    """`keeps_uploads = False` is a promise: decoded into one set of reused buffers (as the
    runtime then does), sparse uploads give the same bits as fresh decodes. A wrong promise
    (an aggregator that kept them) would see every upload turn into the last one."""
    alg = make_algorithm(name, options)
    glob = alg.init_state(lora_state(2, 12, 10, 2, 0), 0)
    sent = alg.sent_keys(glob)
    g = torch.Generator().manual_seed(4)
    ups = [Payload({k: torch.where(torch.rand(v.shape, generator=g) < 0.3, v, torch.zeros(())) for k, v in u.tensors.items()
                    if k in sent}, meta=u.meta) for u in uploads_for(glob, 3, 1)]  # fmt: skip
    blobs = [encode_payload(u) for u in ups]
    shapes = {k: tuple(glob[k].shape) for k in sent}
    info = RoundInfo(2, 3)
    fresh, _ = aggregate(alg.aggregator(glob, [5, 6, 7], info, {}), (decode_payload(b, shapes) for b in blobs))
    agg = alg.aggregator(glob, [5, 6, 7], info, {})
    if agg.keeps_uploads:  # the runtime gives it fresh tensors: nothing to check
        return
    used = []

    def decode(b, buffers):  # how the runtime feeds it (aggregate_encoded): reused buffers
        used.append(buffers)
        return decode_payload(b, shapes, buffers=buffers)

    reused, _ = aggregate_encoded(agg, blobs, decode)
    assert all(isinstance(x, DecodeBuffers) for x in used) and len({id(x) for x in used}) == 1
    for k in fresh.tensors:
        assert torch.equal(fresh.tensors[k], reused.tensors[k]), k


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from fedlowrank.algorithms import make_algorithm
    from fedlowrank.algorithms.aggregation import aggregate
    from fedlowrank.algorithms.base import RoundInfo
    from fedlowrank.codec import decode_payload, encode_payload
    from fedlowrank.payload import Payload
    from fedlowrank.sparsify import topk_mask
    torch.set_num_threads(1)
    name, options, m = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    glob = {}
    for j in range(24):  # 24 modules 2048 x 2048, r = 16: 1.6 M parameters, 6.3 MB
        glob[f"m{j}.lora_A.weight"] = torch.randn(16, 2048, generator=g) / 45
        glob[f"m{j}.lora_B.weight"] = 0.02 * torch.randn(2048, 16, generator=g)
    shapes = {k: tuple(v.shape) for k, v in glob.items()}
    blobs = []
    for i in range(m):  # encoded one at a time: 5% of entries kept
        d = {k: 0.1 * torch.randn(v.shape, generator=g) * v.std() for k, v in glob.items()}
        d = {k: torch.where(topk_mask(x.abs(), 0.95), x, torch.zeros_like(x)) for k, x in d.items()}
        blobs.append(encode_payload(Payload(d, meta={"kind": "delta", "round": 2, "client": i})))
        del d
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    alg = make_algorithm(name, options)
    out, _ = aggregate(alg.aggregator(glob, [1] * m, RoundInfo(2, 0), {}), (decode_payload(b, shapes) for b in blobs))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_mb": (after - before) / 1024, "encoded_mb": sum(map(len, blobs)) / 2**20,
                      "stats": out.stats}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("fedavg", {}), ("fedsrd", {})])
def test_aggregating_200_uploads_stays_under_a_fixed_memory_bound(name, options):
    """200 decoded uploads would be 1.26 GB; streaming holds the accumulators and one upload.
    ("fedsrd" with defaults: 200 x 16 > sketch_above, so "auto" runs the streaming sketch.)"""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, name, json.dumps(options), "200"],
                         capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["grew_mb"] < 150, got
    if name == "fedsrd":
        assert got["stats"]["sketched"] == 1.0


@pytest.mark.slow
def test_a_thousand_clients_with_a_hundred_per_round(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_text(textwrap.dedent(
        """
        algorithms = ["fedavg", "fedsrd"]
        [task]
        name = "digits"
        num_clients = 1000
        partition = "iid"
        local_steps = 1
        [sim]
        rounds = 2
        clients_per_round = 100
        [algorithm.fedsrd]
        method = "sketch"
        """
    ))  # fmt: skip
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    for name in ("fedavg", "fedsrd"):
        lines = [json.loads(x) for x in (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == [1, 2]
        assert all(x["accepted"] == 100 and len(x["clients"]) == 100 for x in lines)
        assert all(len(x["per_client"]) == 100 for x in lines)
        if name == "fedsrd":
            assert all(x["diagnostics"]["sketched"] == 1.0 for x in lines)


def test_iid_partition_deals_evenly_and_an_impossible_dirichlet_is_a_config_error(tmp_path):
    import numpy as np

    from fedlowrank.config import ConfigError
    from fedlowrank.tasks.base import PartitionConfig, partition_labels

    labels = np.arange(1347) % 10
    parts, shares = partition_labels(labels, 10, PartitionConfig(num_clients=1000, partition="iid"), seed=3)
    sizes = [len(p) for p in parts]
    assert min(sizes) == 1 and max(sizes) == 2 and sum(sizes) == 1347
    assert sorted(np.concatenate(parts).tolist()) == list(range(1347))
    with pytest.raises(ConfigError, match="task.min_samples"):
        partition_labels(labels, 10, PartitionConfig(num_clients=1000, alpha=1000.0, min_samples=1), seed=3)
    cfg = tmp_path / "c.toml"
    cfg.write_text('algorithms = ["fedavg"]\n[task]\nname = "digits"\nnum_clients = 1000\nalpha = 1000.0\nmin_samples = 1\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2  # a config error, no traceback
    assert not (tmp_path / "run").exists()
