"""The gamma rank rule and parameter counts (fedlowrank.fedpara.rank)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlowrank.fedpara.rank import (
    dense_param_count,
    fedpara_param_count,
    fedpara_rank,
    lowrank_param_count,
    lowrank_rank,
    max_explicit_rank,
    rank_bounds,
    resolve_rank,
)

dims = st.integers(1, 600)
kernels = st.sampled_from([1, 3, 5, (1, 3), (3, 1), (2, 2)])
gammas = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(dims, dims, kernels)
def test_r_max_is_the_largest_rank_within_the_original_budget(o, i, k):
    _, r_max = rank_bounds(o, i, k)
    dense = dense_param_count(o, i, k)
    assert fedpara_param_count(o, i, r_max, k) <= dense or r_max == 0
    assert fedpara_param_count(o, i, r_max + 1, k) > dense


@settings(max_examples=200, deadline=None)
@given(dims, dims, kernels)
def test_r_min_is_the_smaller_ceil_sqrt(o, i, k):
    r_min, _ = rank_bounds(o, i, k)
    assert r_min == min(math.ceil(math.sqrt(o)), math.ceil(math.sqrt(i)))
    assert (r_min - 1) ** 2 < min(o, i) <= r_min**2 or min(o, i) == r_min == 1


@settings(max_examples=200, deadline=None)
@given(dims, dims, kernels, gammas, gammas)
def test_rank_interpolates_and_is_monotone_in_gamma(o, i, k, g1, g2):
    r_min, r_max = rank_bounds(o, i, k)
    lo, hi = sorted((g1, g2))
    r_lo, r_hi = fedpara_rank(o, i, lo, k), fedpara_rank(o, i, hi, k)
    assert r_lo >= 1
    if r_max >= r_min:
        assert r_min <= r_lo <= r_hi <= r_max
    else:  # tiny layer: FedPara costs more than the original at any rank >= R_min
        assert r_lo >= r_hi


@settings(max_examples=100, deadline=None)
@given(st.integers(4, 600), st.integers(4, 600), kernels)
def test_gamma_end_points(o, i, k):
    r_min, r_max = rank_bounds(o, i, k)
    assert fedpara_rank(o, i, 0.0, k) == r_min
    assert fedpara_rank(o, i, 1.0, k) == max(1, r_max)


def test_known_ranks():
    # R = ceil((1 - g) R_min + g R_max); 512->512 3x3: R_min = 23, R_max = 309
    assert rank_bounds(512, 512, 3) == (23, 309)
    assert fedpara_rank(512, 512, 0.1, 3) == math.ceil(0.9 * 23 + 0.1 * 309) == 52
    # first VGG conv 3->64: R_min = 2, R_max = 6 (2(9R^2 + 67R) <= 1728)
    assert rank_bounds(64, 3, 3) == (2, 6)
    assert fedpara_rank(64, 3, 0.1, 3) == 3
    # Linear 256x256: R_min = 16, R_max = floor(65536 / 1024) = 64
    assert rank_bounds(256, 256) == (16, 64)


def test_gamma_is_read_as_its_decimal_value():
    # 7x42 linear: R_min = R_max = 3, so any gamma gives 3; in binary floating point
    # (1 - 0.2) * 3 + 0.2 * 3 = 3.0000000000000004, whose ceiling would be 4
    assert rank_bounds(7, 42) == (3, 3)
    assert math.ceil((1 - 0.2) * 3 + 0.2 * 3) == 4
    assert fedpara_rank(7, 42, 0.2) == 3


@settings(max_examples=200, deadline=None)
@given(dims, dims, gammas)
def test_lowrank_matrix_rank_is_twice_fedpara_rank_with_equal_budget(o, i, g):
    R = fedpara_rank(o, i, g)
    r = lowrank_rank(o, i, g)
    if 2 * R <= min(o, i):
        assert r == 2 * R
        assert lowrank_param_count(o, i, r) == fedpara_param_count(o, i, R)
    else:
        assert r == min(o, i)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 600), st.integers(2, 600), st.sampled_from([3, 5, (1, 3)]), gammas)
def test_lowrank_tucker_rank_matches_budget(o, i, k, g):
    R = fedpara_rank(o, i, g, k)
    r = lowrank_rank(o, i, g, k)
    budget = fedpara_param_count(o, i, R, k)
    assert 1 <= r <= 2 * R
    assert lowrank_param_count(o, i, r, k) <= budget or r == 1
    assert r == max_explicit_rank(o, i, k) or lowrank_param_count(o, i, r + 1, k) > budget


def test_parameter_count_formulas():
    assert fedpara_param_count(256, 128, 10) == 2 * 10 * (256 + 128)
    assert fedpara_param_count(256, 128, 10, 3) == 2 * (100 * 9 + 10 * (256 + 128))
    assert fedpara_param_count(256, 128, 10, (1, 3)) == 2 * (100 * 3 + 10 * (256 + 128))
    assert lowrank_param_count(256, 128, 20) == 20 * 384
    assert lowrank_param_count(256, 128, 20, 3) == 400 * 9 + 20 * 384
    assert dense_param_count(256, 128, 3) == 256 * 128 * 9


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), float("inf"), "0.5", True])
def test_bad_gamma_names_layer_and_range(gamma):
    with pytest.raises(ValueError, match=r"layer 'features\.3'.*gamma.*\[0, 1\]"):
        fedpara_rank(64, 64, gamma, 3, layer="features.3")


@pytest.mark.parametrize("rank", [0, -1, 65, 2.5, True])
def test_bad_explicit_rank_names_layer_and_range(rank):
    with pytest.raises(ValueError, match=r"layer 'fc'.*rank must be an int in \[1, 64\]"):
        resolve_rank(64, 100, rank=rank, layer="fc")


def test_explicit_rank_overrides_gamma_and_one_is_required():
    assert resolve_rank(64, 64, 3, rank=7, gamma=0.9) == 7
    assert resolve_rank(64, 32, 3, rank=64) == 64  # Tucker: up to max(O, I)
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        resolve_rank(64, 32, rank=33)  # matrix form: up to min(O, I)
    with pytest.raises(ValueError, match="give rank= or gamma="):
        resolve_rank(64, 64)


@pytest.mark.parametrize("bad", [0, -3, 2.0, None])
def test_bad_dimensions(bad):
    with pytest.raises(ValueError, match="out_features"):
        fedpara_rank(bad, 4, 0.5)
    with pytest.raises(ValueError, match="kernel_size"):
        fedpara_rank(4, 4, 0.5, kernel_size=(3, 0))
