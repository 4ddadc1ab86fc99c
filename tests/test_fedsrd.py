"""FedSRD / FedSRD-e server step: the factored method against the paper's dense method."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlowrank.algorithms.fedsrd import decompose

f64 = torch.float64


def rel(x, y):
    return ((x - y).norm() / max(y.norm().item(), 1e-300)).item()


def make_case(seed, d_out, d_in, r, m, zero_B=False, spread=0.3, rank_def=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.zeros(d_out, r, dtype=f64) if zero_B else torch.randn(d_out, r, generator=g, dtype=f64)
    A = torch.randn(r, d_in, generator=g, dtype=f64)
    if rank_def and r > rank_def:  # factors of rank r - rank_def
        k = r - rank_def
        A = torch.randn(r, k, generator=g, dtype=f64) @ torch.randn(k, d_in, generator=g, dtype=f64)
        if not zero_B:
            B = torch.randn(d_out, k, generator=g, dtype=f64) @ torch.randn(k, r, generator=g, dtype=f64)
    Bs = [B + spread * torch.randn(d_out, r, generator=g, dtype=f64) for _ in range(m)]
    As = [A + spread * torch.randn(r, d_in, generator=g, dtype=f64) for _ in range(m)]
    w = torch.rand(m, generator=g, dtype=f64) + 0.1
    return B, A, Bs, As, (w / w.sum()).tolist()


def check_agreement(B, A, Bs, As, w, t, efficient, tol=1e-5):
    dB_f, dA_f = decompose(B, A, Bs, As, w, t, efficient, method="factored")
    dB_d, dA_d = decompose(B, A, Bs, As, w, t, efficient, method="dense")
    if t % 2 == 1:  # odd rounds solve for B (Eq. 13), dA = 0
        assert torch.count_nonzero(dA_f) == 0 and torch.count_nonzero(dA_d) == 0
        assert rel(dB_f, dB_d) < tol
    else:  # even rounds solve for A (Eq. 12), dB = 0
        assert torch.count_nonzero(dB_f) == 0 and torch.count_nonzero(dB_d) == 0
        if B.abs().max() == 0:
            assert torch.count_nonzero(dA_d) == 0 and torch.count_nonzero(dA_f) == 0  # pinv(0) = 0
        else:
            assert rel(dA_f, dA_d) < tol
    return dB_f, dA_f


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_out=st.integers(1, 40),
    d_in=st.integers(1, 40),
    r=st.integers(1, 6),
    m=st.integers(1, 5),
    t=st.integers(1, 6),
    efficient=st.booleans(),
    zero_B=st.booleans(),
    rank_def=st.integers(0, 2),
)
def test_factored_matches_dense_float64(seed, d_out, d_in, r, m, t, efficient, zero_B, rank_def):
    B, A, Bs, As, w = make_case(seed, d_out, d_in, r, m, zero_B, rank_def=rank_def)
    if not efficient:
        # the rank-r truncation is only well defined when sigma_r > sigma_{r+1}
        W = sum(wi * Bi @ Ai for wi, Bi, Ai in zip(w, Bs, As))
        S = torch.linalg.svdvals(W)
        if S.numel() > r and (S[r - 1] - S[r]) < 1e-6 * S[0]:
            return
    check_agreement(B, A, Bs, As, w, t, efficient)


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("t", [1, 2])
def test_round_one_with_B_zero_solves_for_B_with_pinv_A(efficient, t):
    # the paper's parity: round 1 (odd) updates B using the random, full-rank A^0
    B, A, Bs, As, w = make_case(5, 30, 20, 4, 4, zero_B=True)
    As = [A.clone() for _ in As]  # round 1: B = 0, A unchanged by clients that only move B
    dB, dA = check_agreement(B, A, Bs, As, w, t, efficient)
    if t == 1:
        assert dB.norm() > 0
        # with A fixed and full row rank, the update reproduces the rank-r target exactly
        W = sum(wi * Bi @ A for wi, Bi in zip(w, Bs))
        torch.testing.assert_close(dB @ A, W, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("t", [1, 2])
def test_nearly_equal_clients_are_well_conditioned(efficient, t):
    # clients whose factors agree to 1e-9: X = [B_1..B_m] is numerically rank-deficient
    B, A, Bs, As, w = make_case(11, 60, 50, 6, 4, spread=1e-9)
    check_agreement(B, A, Bs, As, w, t, efficient, tol=1e-5)


@pytest.mark.parametrize("efficient", [False, True])
def test_float32_agrees_to_1e3(efficient):
    B, A, Bs, As, w = make_case(2, 300, 200, 8, 4, spread=0.05)
    for t in (1, 2):
        f = decompose(B.float(), A.float(), [b.float() for b in Bs], [a.float() for a in As], w, t, efficient)
        d = decompose(B, A, Bs, As, w, t, efficient, method="dense")
        i = 0 if t == 1 else 1
        assert rel(f[i].double(), d[i]) < 1e-3


def test_fedsrd_e_target_is_unprojected_and_fedsrd_is_rank_r():
    B, A, Bs, As, w = make_case(3, 20, 15, 3, 4)
    W = sum(wi * Bi @ Ai for wi, Bi, Ai in zip(w, Bs, As))
    # FedSRD-e, odd: dB = (W - BA) pinv(A)
    dB_e, _ = decompose(B, A, Bs, As, w, 1, True)
    torch.testing.assert_close(dB_e, (W - B @ A) @ torch.linalg.pinv(A))
    # FedSRD, even: dA = pinv(B)(SVD_3(W) - BA)
    U, S, Vh = torch.linalg.svd(W)
    _, dA = decompose(B, A, Bs, As, w, 2, False)
    torch.testing.assert_close(dA, torch.linalg.pinv(B) @ ((U[:, :3] * S[:3]) @ Vh[:3] - B @ A))


def test_factored_never_builds_the_dense_matrix():
    # 2e5 x 1e5 in float32 would be 80 GB; the factored step needs a few megabytes
    g = torch.Generator().manual_seed(0)
    d_out, d_in, r, m = 200_000, 100_000, 2, 2
    B, A = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    Bs = [B + 0.1 * torch.randn(d_out, r, generator=g) for _ in range(m)]
    As = [A + 0.1 * torch.randn(r, d_in, generator=g) for _ in range(m)]
    for efficient in (False, True):
        for t in (1, 2):
            dB, dA = decompose(B, A, Bs, As, [0.5, 0.5], t, efficient)
            assert dB.shape == B.shape and dA.shape == A.shape
            assert torch.isfinite(dB).all() and torch.isfinite(dA).all()


def test_decompose_rejects_bad_inputs():
    B, A, Bs, As, w = make_case(0, 5, 4, 2, 2)
    with pytest.raises(ValueError, match="client 1"):
        decompose(B, A, [Bs[0], Bs[1][:, :1]], As, w, 1, False)
    with pytest.raises(ValueError, match="weight"):
        decompose(B, A, Bs, As, [1.0], 1, False)
    with pytest.raises(ValueError, match="rounds are numbered from 1"):
        decompose(B, A, Bs, As, w, 0, False)
    with pytest.raises(ValueError, match="method"):
        decompose(B, A, Bs, As, w, 1, False, method="svd")


def test_float64_server_step_removes_the_float32_cancellation():
    """Clients agreeing to 1e-6: SVD_r(W) - B A cancels in float32; server_dtype="float64" keeps
    the float32 parameters and wire format but solves in float64."""
    from fedlowrank.algorithms import RoundInfo, make_algorithm
    from fedlowrank.payload import Payload

    B, A, Bs, As, w = make_case(5, 64, 48, 4, 3, spread=1e-6)
    B, A = B.float().double(), A.float().double()  # the float32 values, exactly, in float64
    Bs, As = [b.float().double() for b in Bs], [a.float().double() for a in As]
    _, dA_ref = decompose(B, A, Bs, As, [1 / 3] * 3, 2, False)  # the reference
    state = {"m.lora_B": B.float(), "m.lora_A": A.float()}
    uploads = [Payload({"m.lora_B": Bi.float() - B.float(), "m.lora_A": Ai.float() - A.float()}, meta={"kind": "delta"})
               for Bi, Ai in zip(Bs, As)]  # fmt: skip
    errors = {}
    for dtype in ("float32", "float64"):
        alg = make_algorithm("fedsrd", {"server_dtype": dtype, "download_drop": 0.0})
        bc = alg.server_broadcast(state, uploads, [1, 1, 1], RoundInfo(round=2, seed=0))
        assert bc.tensors["m.lora_A"].dtype == torch.float32
        errors[dtype] = rel(bc.tensors["m.lora_A"].double(), dA_ref)
    assert errors["float64"] < 1e-4  # float32 deltas (exact up to 1e-7 / 1e-6) and the cast back
    assert errors["float32"] > 10 * errors["float64"]


def test_server_dtype_is_checked_by_name():
    from fedlowrank.algorithms import make_algorithm
    from fedlowrank.config import ConfigError

    with pytest.raises(ConfigError, match="server_dtype"):
        make_algorithm("fedsrd", {"server_dtype": "float16"})
