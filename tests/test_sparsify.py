"""FedSRD Eq. 6-8 and DARE masks."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlowrank.sparsify import (
    adaptive_sparsity,
    dare,
    importance_scores,
    keep_count,
    l1_rescale,
    pearson_kurtosis,
    seeded_keep_mask,
    topk_mask,
)

dims = st.integers(min_value=1, max_value=12)


@settings(max_examples=60, deadline=None)
@given(d_out=dims, r=dims, d_in=dims, seed=st.integers(0, 2**31 - 1))
def test_importance_is_frobenius_norm_of_rank_one_contribution(d_out, r, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    dB, B_new = torch.randn(d_out, r, generator=g, dtype=torch.float64), torch.randn(d_out, r, generator=g, dtype=torch.float64)
    dA, A_old = torch.randn(r, d_in, generator=g, dtype=torch.float64), torch.randn(r, d_in, generator=g, dtype=torch.float64)
    IB, IA = importance_scores(dB, dA, B_new, A_old)
    u, v = int(torch.randint(d_out, (1,), generator=g)), int(torch.randint(r, (1,), generator=g))
    E = torch.zeros_like(dB)
    E[u, v] = dB[u, v]
    assert torch.isclose(IB[u, v], torch.linalg.norm(E @ A_old), rtol=1e-12)  # dB.A_old term
    u, v = int(torch.randint(r, (1,), generator=g)), int(torch.randint(d_in, (1,), generator=g))
    E = torch.zeros_like(dA)
    E[u, v] = dA[u, v]
    assert torch.isclose(IA[u, v], torch.linalg.norm(B_new @ E), rtol=1e-12)  # B_new.dA term


def test_importance_uses_old_A_rows_and_new_B_columns():
    dB = torch.ones(2, 2)
    dA = torch.ones(2, 3)
    A_old = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])  # row norms 5, 1
    B_new = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # column norms 1, 2
    IB, IA = importance_scores(dB, dA, B_new, A_old)
    assert IB.tolist() == [[5.0, 1.0], [5.0, 1.0]]
    assert IA.tolist() == [[1.0] * 3, [2.0] * 3]


def test_importance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="dB"):
        importance_scores(torch.ones(3, 2), torch.ones(2, 4), torch.ones(3, 3), torch.ones(2, 4))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=200))
def test_pearson_kurtosis_matches_scipy(values):
    x = np.array(values)
    if np.ptp(x) < 1e-6 * max(1.0, np.abs(x).max()):
        return  # numerically constant: scipy's answer is meaningless
    ours = pearson_kurtosis(torch.tensor(x))
    ref = scipy.stats.kurtosis(x, fisher=False)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_kurtosis_of_normal_is_about_three_and_constant_is_one():
    g = torch.Generator().manual_seed(0)
    assert pearson_kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.05)
    assert pearson_kurtosis(torch.full((10,), 2.5)) == 1.0


def test_adaptive_sparsity_formula_natural_log_and_cap():
    g = torch.Generator().manual_seed(1)
    u = torch.rand(100_000, generator=g)  # uniform: kurtosis 1.8 -> 0.1 ln 1.8 = 0.059 < 0.11
    k = pearson_kurtosis(u)
    assert k == pytest.approx(1.8, abs=0.02)
    assert adaptive_sparsity(u) == pytest.approx(0.85 + 0.1 * math.log(k))
    half_normal = torch.randn(100_000, generator=g).abs()  # kurtosis ~3.87 -> offset 0.135, capped at 0.11
    assert adaptive_sparsity(half_normal) == pytest.approx(0.96)
    assert adaptive_sparsity(half_normal, alpha=0.9, coeff=0.05, cap=1.0) == pytest.approx(
        0.9 + 0.05 * math.log(pearson_kurtosis(half_normal))
    )
    # kurtosis below 1 is impossible, but a two-point distribution has exactly 1: offset 0
    assert adaptive_sparsity(torch.tensor([0.0, 1.0] * 50)) == pytest.approx(0.85)


@pytest.mark.parametrize("kw", [{"alpha": 1.0}, {"alpha": -0.1}, {"coeff": -1.0}, {"cap": -0.5}])
def test_adaptive_sparsity_rejects_bad_parameters(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        adaptive_sparsity(torch.rand(10), **kw)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 400),
    sparsity=st.floats(0.0, 1.0),
    levels=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_keeps_exact_count_of_largest(n, sparsity, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(levels, (n,), generator=g).double()  # many ties
    mask = topk_mask(scores, sparsity)
    k = max(1, round((1 - sparsity) * n))
    assert int(mask.sum()) == k == keep_count(n, sparsity)
    if k < n:
        assert scores[mask].min() >= scores[~mask].max()
    # deterministic ties: among equal scores at the threshold, lower indices are kept first
    thr = scores[mask].min()
    tied = torch.nonzero(scores == thr).reshape(-1)
    kept = mask[tied]
    assert not (~kept[:-1] & kept[1:]).any()
    assert torch.equal(mask, topk_mask(scores, sparsity))


def test_topk_keeps_shape_and_rejects_bad_input():
    s = torch.arange(12.0).reshape(3, 4)
    m = topk_mask(s, 0.75)
    assert m.shape == (3, 4) and m.sum() == 3 and m[2, 1:].all()
    assert topk_mask(s, 1.0).sum() == 1  # at least one entry
    with pytest.raises(ValueError, match="sparsity"):
        topk_mask(s, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([1.0, float("nan")]), 0.5)


def test_seeded_mask_is_reproducible_and_has_the_right_rate():
    a = seeded_keep_mask((300, 200), 0.2, seed=1234)
    assert torch.equal(a, seeded_keep_mask((300, 200), 0.2, seed=1234))
    assert not torch.equal(a, seeded_keep_mask((300, 200), 0.2, seed=1235))
    assert a.float().mean().item() == pytest.approx(0.2, abs=0.01)


def test_dare_drops_and_rescales_on_the_seeded_mask():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(100, 50, generator=g)
    out = dare(t, 0.8, seed=7)
    keep = seeded_keep_mask(t.shape, 0.2, seed=7)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))
    torch.testing.assert_close(out[keep], t[keep] / 0.2)
    # unbiased: E[out] = t
    mean = torch.stack([dare(t, 0.8, s) for s in range(400)]).mean(0)
    assert (mean - t).abs().mean() < 0.15 * t.abs().mean()


def test_l1_rescale_preserves_l1_mass():
    dense = torch.tensor([1.0, -2.0, 3.0, -4.0])
    sparse = torch.tensor([0.0, 0.0, 3.0, -4.0])
    out = l1_rescale(dense, sparse)
    assert out.abs().sum().item() == pytest.approx(10.0)
    assert torch.equal(out[:2], torch.zeros(2))
    assert torch.equal(l1_rescale(dense, torch.zeros(4)), torch.zeros(4))
