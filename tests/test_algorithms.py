"""Every algorithm's rules (docs/algorithms.md) on random LoRA states, no I/O."""

import pytest
import torch

from fedlowrank.algorithms import ALGORITHMS, ClientInfo, RoundInfo, apply_broadcast, make_algorithm
from fedlowrank.algorithms.base import aggregation_weights, derive_seed, state_payload
from fedlowrank.algorithms.fedsrd import decompose
from fedlowrank.config import ConfigError
from fedlowrank.lora import lora_pairs
from fedlowrank.sparsify import adaptive_sparsity, dare, importance_scores, keep_count, seeded_keep_mask

D_OUT, D_IN, R = 24, 16, 4


def make_state(seed=0, zero_B=False, head=True):
    g = torch.Generator().manual_seed(seed)
    s = {}
    for name in ("l0.q", "l0.v"):
        s[f"{name}.lora_A"] = torch.randn(R, D_IN, generator=g) / D_IN**0.5
        s[f"{name}.lora_B"] = torch.zeros(D_OUT, R) if zero_B else 0.1 * torch.randn(D_OUT, R, generator=g)
    if head:
        s["head.weight"] = torch.randn(3, D_OUT, generator=g)
    return s


def train(state, seed, scale=0.05, frozen=()):
    g = torch.Generator().manual_seed(seed)
    return {k: v if k in frozen else v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def run_round(alg, state, t, m=3, seed=0):
    uploads = []
    for i in range(m):
        start = dict(state)
        trainable = set(alg.trainable_keys(start))
        trained = train(start, 100 * t + i, frozen=set(start) - trainable)
        uploads.append(alg.client_payload(start, trained, ClientInfo(round=t, client_id=i, seed=seed)))
    bc = alg.server_broadcast(state, uploads, [10 * (i + 1) for i in range(m)], RoundInfo(round=t, seed=seed))
    return uploads, bc


def test_registry_lists_every_method():
    assert set(ALGORITHMS) == {
        "fedsrd", "fedsrd-e", "fedsrd-plus", "fedsrd-e-plus", "fedavg", "fedprox", "ffa-lora", "flexlora", "fed-dare",
        "fedavg-magnitude", "fedavg-importance", "fedper", "fedsa-lora",
    }


def test_make_algorithm_rejects_bad_names_and_fields():
    with pytest.raises(ConfigError, match="unknown 'fedsdr'"):
        make_algorithm("fedsdr")
    with pytest.raises(ConfigError, match=r"algorithm\.fedsrd\.download_dropp: unknown field \(did you mean 'download_drop'"):
        make_algorithm("fedsrd", {"download_dropp": 0.5})
    with pytest.raises(ConfigError, match="algorithm.fedsrd.upload_sparsity"):
        make_algorithm("fedsrd", {"upload_sparsity": 1.5})
    with pytest.raises(ConfigError, match="algorithm.fedsrd.efficient: expected true or false"):
        make_algorithm("fedsrd", {"efficient": "yes"})
    with pytest.raises(ConfigError, match="upload_mask"):
        make_algorithm("fedsrd", {"upload_mask": "topk"})
    assert make_algorithm("fedsrd-e").config.efficient is True
    assert make_algorithm("fedprox").config.prox_mu == 0.01
    assert make_algorithm("fed-dare").config.upload_sparsity == 0.9


def test_fedsrd_client_uploads_importance_topk_with_adaptive_ratio():
    alg = make_algorithm("fedsrd")
    start = make_state(1)
    trained = train(start, 2)
    up = alg.client_payload(start, trained, ClientInfo(round=1, client_id=0))
    for b_key, a_key in lora_pairs(start).values():
        dB, dA = trained[b_key] - start[b_key], trained[a_key] - start[a_key]
        IB, IA = importance_scores(dB, dA, trained[b_key], start[a_key])
        for key, d, scores in ((b_key, dB, IB), (a_key, dA, IA)):
            sent = up.tensors[key]
            kept = sent != 0
            assert int(kept.sum()) == keep_count(d.numel(), adaptive_sparsity(scores))
            assert torch.equal(sent[kept], d[kept])  # no rescaling by default
            assert scores[kept].min() >= scores[~kept].max()  # the most important entries
    # a non-LoRA key travels as a dense delta
    torch.testing.assert_close(up.tensors["head.weight"], trained["head.weight"] - start["head.weight"])


def test_fixed_ratio_and_l1_rescale_options():
    alg = make_algorithm("fedsrd", {"adaptive": False, "upload_sparsity": 0.75, "upload_rescale": "l1"})
    start = make_state(1, head=False)
    trained = train(start, 2)
    up = alg.client_payload(start, trained, ClientInfo(round=1, client_id=0))
    for key, sent in up.tensors.items():
        d = trained[key] - start[key]
        assert int((sent != 0).sum()) == round(0.25 * d.numel())
        assert sent.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["fedsrd", "fedsrd-e"])
def test_fedsrd_round_parity_dare_and_shared_apply(name):
    alg = make_algorithm(name)
    state = make_state(0, zero_B=True)
    pairs = lora_pairs(state)
    for t in (1, 2, 3, 4):
        uploads, bc = run_round(alg, state, t, seed=42)
        weights = aggregation_weights([10, 20, 30], "uniform")
        for b_key, a_key in pairs.values():
            solved = b_key if t % 2 == 1 else a_key
            other = a_key if t % 2 == 1 else b_key
            assert solved in bc.tensors and other not in bc.tensors  # one matrix per module
            seed, keep = bc.seeds[solved]
            assert keep == pytest.approx(0.2) and seed == derive_seed(42, "download", t, solved)
            B, A = state[b_key], state[a_key]
            dB, dA = decompose(
                B, A, [B + u.tensors[b_key] for u in uploads], [A + u.tensors[a_key] for u in uploads],
                weights, t, alg.config.efficient,
            )
            expected = dare(dB if t % 2 == 1 else dA, 0.8, seed)
            torch.testing.assert_close(bc.tensors[solved], expected)
            assert torch.count_nonzero(bc.tensors[solved][~seeded_keep_mask(expected.shape, 0.2, seed)]) == 0
        # the head is averaged FedAvg-style with uniform weights
        torch.testing.assert_close(bc.tensors["head.weight"], sum(u.tensors["head.weight"] for u in uploads) / 3)
        server = apply_broadcast(state, bc)
        client = apply_broadcast(dict(state), bc)
        for k in server:
            assert torch.equal(server[k], client[k])
        if t == 1:  # B starts at 0 and round 1 moves it (pinv of the random A^0)
            assert all(server[b].abs().sum() > 0 for b, _ in pairs.values())
        state = server


def test_fedsrd_sample_weighting():
    alg = make_algorithm("fedsrd", {"weighting": "samples", "download_drop": 0.0})
    state = make_state(0)
    uploads, bc = run_round(alg, state, 2)
    assert not bc.seeds
    w = [10 / 60, 20 / 60, 30 / 60]
    torch.testing.assert_close(bc.tensors["head.weight"], sum(wi * u.tensors["head.weight"] for wi, u in zip(w, uploads)))


def test_fedavg_averages_A_and_B_separately():
    alg = make_algorithm("fedavg")
    state = make_state(0)
    uploads, bc = run_round(alg, state, 1)
    assert bc.meta["kind"] == "delta" and set(bc.tensors) == set(state)
    new = apply_broadcast(state, bc)
    for k in state:
        trained = [state[k] + u.tensors[k] for u in uploads]
        torch.testing.assert_close(new[k], sum(trained) / 3)


def test_fedprox_regularizer_is_half_mu_squared_distance():
    alg = make_algorithm("fedprox")
    g = make_state(0)
    p = train(g, 1)
    expected = 0.5 * 0.01 * sum(((p[k] - g[k]) ** 2).sum() for k in g)
    torch.testing.assert_close(alg.regularizer(p, g), expected)
    assert make_algorithm("fedavg").regularizer(p, g) is None


def test_ffa_lora_freezes_A_and_sends_B_only():
    alg = make_algorithm("ffa-lora")
    state = make_state(0)
    assert not any("lora_A" in k for k in alg.trainable_keys(state))
    uploads, bc = run_round(alg, state, 1)
    assert all("lora_A" not in k for u in uploads for k in u.tensors)
    new = apply_broadcast(state, bc)
    # aggregation of the products is exact: mean_i B_i A = B_avg A
    for b_key, a_key in lora_pairs(state).values():
        prods = [(state[b_key] + u.tensors[b_key]) @ state[a_key] for u in uploads]
        torch.testing.assert_close(new[b_key] @ new[a_key], sum(prods) / 3)


def test_flexlora_broadcasts_truncated_svd_of_mean_product():
    alg = make_algorithm("flexlora")
    state = make_state(0)
    uploads, bc = run_round(alg, state, 1)
    assert bc.meta["kind"] == "state"
    new = apply_broadcast(state, bc)
    for b_key, a_key in lora_pairs(state).values():
        W = sum(
            (state[b_key] + u.tensors[b_key]).double() @ (state[a_key] + u.tensors[a_key]).double() for u in uploads
        ) / 3
        U, S, Vh = torch.linalg.svd(W)
        target = (U[:, :R] * S[:R]) @ Vh[:R]
        torch.testing.assert_close(new[b_key].double() @ new[a_key].double(), target, rtol=1e-4, atol=1e-5)
        # B = U sqrt(S), A = sqrt(S) V^T: column norms of B equal row norms of A
        torch.testing.assert_close(new[b_key].norm(dim=0), new[a_key].norm(dim=1), rtol=1e-4, atol=1e-6)


def test_fed_dare_uploads_seeded_random_masks():
    alg = make_algorithm("fed-dare")
    start = make_state(0)
    trained = train(start, 1)
    up = alg.client_payload(start, trained, ClientInfo(round=3, client_id=2, seed=9))
    factors = {k for pair in lora_pairs(start).values() for k in pair}
    assert factors and set(up.tensors) - factors  # the state has a head next to the factors
    for k, t in up.tensors.items():
        if k not in factors:  # a head travels dense, as with importance masks
            assert k not in up.seeds
            torch.testing.assert_close(t, trained[k] - start[k])
            continue
        seed, keep = up.seeds[k]
        assert keep == pytest.approx(0.1) and seed == derive_seed(9, "upload", 3, 2, k)
        torch.testing.assert_close(t, dare(trained[k] - start[k], 0.9, seed))


@pytest.mark.parametrize("name,scorer", [("fedavg-magnitude", "magnitude"), ("fedavg-importance", "importance")])
def test_topk_plugins_keep_their_own_scores(name, scorer):
    alg = make_algorithm(name)
    start = make_state(0, head=False)
    trained = train(start, 1)
    up = alg.client_payload(start, trained, ClientInfo(round=1, client_id=0))
    for b_key, a_key in lora_pairs(start).values():
        dB, dA = trained[b_key] - start[b_key], trained[a_key] - start[a_key]
        IB, IA = importance_scores(dB, dA, trained[b_key], start[a_key])
        for key, d, imp in ((b_key, dB, IB), (a_key, dA, IA)):
            scores = d.abs() if scorer == "magnitude" else imp
            kept = up.tensors[key] != 0
            assert int(kept.sum()) == keep_count(d.numel(), adaptive_sparsity(scores))
            assert scores[kept].min() >= scores[~kept].max()


def test_state_payload_and_apply_replace_values():
    state = make_state(0)
    other = make_state(5)
    p = state_payload(other, list(other), round=7)
    new = apply_broadcast(state, p)
    assert all(torch.equal(new[k], other[k]) for k in state)
    with pytest.raises(KeyError, match="not in the state"):
        apply_broadcast({}, p)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_rounds_and_keeps_shapes(name):
    alg = make_algorithm(name)
    state = make_state(3, zero_B=True)
    for t in (1, 2, 3):
        uploads, bc = run_round(alg, state, t)
        expected = alg.upload_shapes(state)
        for u in uploads:
            assert {k: tuple(v.shape) for k, v in u.tensors.items()} == expected
        state = apply_broadcast(state, bc)
        assert all(torch.isfinite(v).all() for v in state.values())


def test_balance_factors_keeps_the_product_and_equalises_spectra():
    from fedlowrank.lora import balance_factors

    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 4, generator=g, dtype=torch.float64) * torch.tensor([1e-3, 1e-2, 1.0, 5.0], dtype=torch.float64)
    A = torch.randn(4, 20, generator=g, dtype=torch.float64) * 100
    B2, A2 = balance_factors(B, A)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(B2.mT @ B2, A2 @ A2.mT, rtol=1e-10, atol=1e-10)
    # rank-deficient (B = 0 at the start): unchanged, A keeps its random init
    Z, A3 = balance_factors(torch.zeros(30, 4, dtype=torch.float64), A)
    assert torch.equal(Z, torch.zeros(30, 4, dtype=torch.float64)) and torch.equal(A3, A)


@pytest.mark.parametrize("name", ["fedsrd", "fedsrd-e"])
def test_rebalance_changes_factors_not_products(name):
    plain = make_algorithm(name)
    balanced = make_algorithm(name, {"rebalance": True})
    state = make_state(0, zero_B=True)
    checked = []
    for t in (1, 2, 3, 4):
        _, bc = run_round(balanced, state, t)
        new_plain = plain.apply_broadcast(state, bc)
        new = balanced.apply_broadcast(state, bc)
        for b_key, a_key in lora_pairs(state).values():
            torch.testing.assert_close(new[b_key] @ new[a_key], new_plain[b_key] @ new_plain[a_key], rtol=1e-4, atol=1e-6)
            Bb, Ab = new[b_key], new[a_key]
            if torch.equal(Bb, new_plain[b_key]) and torch.equal(Ab, new_plain[a_key]):
                # left as it is only when B A is rank-deficient (a DARE mask can empty a column of B)
                S = torch.linalg.svdvals(Bb.double() @ Ab.double())
                assert S[R - 1] < 1e-5 * S[0]
            else:
                checked.append(t)
                torch.testing.assert_close(Bb.mT @ Bb, Ab @ Ab.mT, rtol=1e-3, atol=1e-5)
        again = balanced.apply_broadcast(state, bc)  # server and clients apply identically
        assert all(torch.equal(again[k], new[k]) for k in new)
        state = new
    assert checked  # the balanced branch ran
