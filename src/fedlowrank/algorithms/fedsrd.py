"""FedSRD and FedSRD-e: Sparsify, Reconstruct, Decompose.

Yan, Xie, Shen, Fang, Wu. "FedSRD: Sparsify-Reconstruct-Decompose for Communication-Efficient
Federated Large Language Models Fine-Tuning", WWW '26 (arXiv 2510.04601).

Client (Section 4.1): deltas dB = B' - B, dA = A' - A; importance scores (Eq. 6); per-matrix
adaptive sparsity (Eq. 7); keep the top-k by importance (Eq. 8); upload the sparse deltas.

Server, per LoRA module, round t (Section 4.2-4.3, Alg. 1):
  1. reconstruct B_i = B + dB_i, A_i = A + dA_i and aggregate W = sum_i p_i B_i A_i    (Eq. 9)
  2. target  T = SVD_r(W) - B A        (FedSRD, Eq. 10)   or   T = W - B A   (FedSRD-e)
  3. t odd:  dB = T pinv(A), dA = 0    (Eq. 13);   t even: dA = pinv(B) T, dB = 0   (Eq. 12)
     (the paper's parity: round 1 solves for B with pinv(A^0), A^0 random and full rank; the
     published code starts with an A-update, a no-op while B = 0)
  4. DARE on the one non-zero delta: drop with p = 0.8, scale kept entries by 1/(1-p); the mask
     comes from a seed carried in the broadcast
  5. server and clients add the same sparse delta.

`decompose(..., method="factored")` never builds a d_out x d_in matrix: W has rank at most m r,
W = X diag(p) Z with X = [B_1..B_m] (d_out x q) and Z = [A_1; ..; A_m] (q x d_in), q = m r.
Householder QR of X and Z^T (Q kept implicit as reflectors) turns the SVD into one of a q x q
core, and the solves use T pinv(A) = SVD_r(W) pinv(A) - B (A pinv(A)) (and the mirror for even
rounds), so nothing larger than d x q is built: O((d_out + d_in) q^2) in all. Householder QR stays
backward stable when clients' factors nearly agree (X nearly rank-deficient), where Gram or
Cholesky routes square the condition number. FedSRD-e needs no QR: T = sum_i p_i dB_i A_i +
B (sum_i p_i A_i - A) is already a product of a d_out x q and a q x d_in factor, computed
without the cancellation of W - B A. `method="dense"` is the paper's reference (build W, full
SVD, pinv), kept for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlowrank.algorithms.base import (
    KIND_DELTA,
    Algorithm,
    ClientInfo,
    RoundInfo,
    aggregation_weights,
    check_fields,
    derive_seed,
    mean_delta,
    reconstruct,
    weighted_mean,
)
from fedlowrank.algorithms.upload import UploadConfig, sparse_upload
from fedlowrank.config import choice
from fedlowrank.lora import balance_factors, lora_pairs
from fedlowrank.payload import Payload
from fedlowrank.sparsify import dare

__all__ = ["FedSRD", "FedSRDConfig", "FedSRDe", "decompose"]


def _check_inputs(B, A, client_Bs, client_As, weights, round) -> None:
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"decompose: B {tuple(B.shape)} and A {tuple(A.shape)} are not (d_out x r), (r x d_in)")
    m = len(client_Bs)
    if m == 0 or len(client_As) != m or len(weights) != m:
        raise ValueError(
            f"decompose: need one B, A and weight per client, got {len(client_Bs)} Bs, "
            f"{len(client_As)} As, {len(weights)} weights"
        )
    for i, (Bi, Ai) in enumerate(zip(client_Bs, client_As)):
        if Bi.shape != B.shape or Ai.shape != A.shape:
            raise ValueError(
                f"decompose: client {i} has B {tuple(Bi.shape)}, A {tuple(Ai.shape)}; "
                f"expected {tuple(B.shape)}, {tuple(A.shape)}"
            )
    if int(round) < 1:
        raise ValueError(f"decompose: rounds are numbered from 1, got {round}")


def _decompose_dense(B, A, client_Bs, client_As, weights, round, efficient):
    """The paper's server step: build W (d_out x d_in), full SVD, pseudo-inverse."""
    r = B.shape[1]
    W = weighted_mean([Bi @ Ai for Bi, Ai in zip(client_Bs, client_As)], weights)
    if efficient:
        T = W - B @ A
    else:
        U, S, Vh = torch.linalg.svd(W)  # the published code's call: full_matrices=True
        k = min(r, S.numel())
        T = (U[:, :k] * S[:k]) @ Vh[:k] - B @ A
    if round % 2 == 1:
        return T @ torch.linalg.pinv(A), torch.zeros_like(A)
    return torch.zeros_like(B), torch.linalg.pinv(B) @ T


def _householder(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of M (d x q) kept implicit: (reflectors, tau, R) with R (min(d, q) x q)."""
    a, tau = torch.geqrf(M)
    k = min(M.shape)
    return a, tau, torch.triu(a[:k])


def _q_times(a: torch.Tensor, tau: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Q @ M for the reduced Q (d x k) of a Householder QR, M (k x c); O(d k c), Q never formed."""
    d, k = a.shape[0], M.shape[0]
    if k < d:
        M = torch.cat([M, M.new_zeros(d - k, M.shape[1])], dim=0)
    return torch.ormqr(a, tau, M, left=True, transpose=False)


def _qt_times(a: torch.Tensor, tau: torch.Tensor, M: torch.Tensor, k: int) -> torch.Tensor:
    """Q^T @ M for the reduced Q (d x k), M (d x c)."""
    return torch.ormqr(a, tau, M, left=True, transpose=True)[:k]


def _decompose_factored(B, A, client_Bs, client_As, weights, round, efficient):
    r = B.shape[1]
    odd = round % 2 == 1
    pinv_A = torch.linalg.pinv(A) if odd else None  # (d_in, r): O(d_in r^2)
    pinv_B = None if odd else torch.linalg.pinv(B)  # (r, d_out)
    if efficient:
        # T = W - B A = sum_i p_i dB_i A_i + B (sum_i p_i A_i - A) = X @ Y, with
        # X = [dB_1..dB_m, B] (d_out, q) and Y (q, d_in): no cancellation, no QR.
        dBs = [Bi - B for Bi in client_Bs]
        X = torch.cat(dBs + [B], dim=1)
        tail = weighted_mean(client_As, weights) - A
        Y = torch.cat([w * Ai for w, Ai in zip(weights, client_As)] + [tail], dim=0)
        if odd:
            return X @ (Y @ pinv_A), torch.zeros_like(A)
        return torch.zeros_like(B), (pinv_B @ X) @ Y
    # FedSRD: W = X diag(p) Z with X = [B_1..B_m] (d_out, q), Z = [A_1; ..; A_m] (q, d_in),
    # q = m r. X = Q_L R_L and Z^T = Q_R R_R (Householder, Q kept implicit), so
    # W = Q_L (R_L diag(p) R_R^T) Q_R^T and SVD_r(W) = Q_L U_r S_r V_r^T Q_R^T from the core's SVD.
    X = torch.cat(client_Bs, dim=1)
    Z = torch.cat(client_As, dim=0)
    p = torch.cat([torch.full((r,), w, dtype=X.dtype, device=X.device) for w in weights])
    aL, tauL, R_L = _householder(X)
    aR, tauR, R_R = _householder(Z.mT)
    U, S, Vh = torch.linalg.svd((R_L * p[None, :]) @ R_R.mT, full_matrices=False)
    k = min(r, S.numel())
    US, Vh = U[:, :k] * S[:k], Vh[:k]  # SVD_r(W) = Q_L US Vh Q_R^T
    if odd:
        # dB = (SVD_r(W) - B A) pinv(A) = Q_L US (Vh Q_R^T pinv(A)) - B (A pinv(A))
        M = US @ (Vh @ _qt_times(aR, tauR, pinv_A, R_R.shape[0]))
        return _q_times(aL, tauL, M) - B @ (A @ pinv_A), torch.zeros_like(A)
    # dA = pinv(B) (SVD_r(W) - B A) = ((pinv(B) Q_L) US Vh) Q_R^T - (pinv(B) B) A
    N = (_qt_times(aL, tauL, pinv_B.mT, R_L.shape[0]).mT @ US) @ Vh  # (r, k_R)
    return torch.zeros_like(B), _q_times(aR, tauR, N.mT).mT - (pinv_B @ B) @ A


def decompose(
    B: torch.Tensor,
    A: torch.Tensor,
    client_Bs: Sequence[torch.Tensor],
    client_As: Sequence[torch.Tensor],
    weights: Sequence[float],
    round: int,
    efficient: bool,
    method: str = "factored",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSRD's server update of one LoRA module before download sparsification.

    B (d_out, r), A (r, d_in): the global factors; client_Bs / client_As: the reconstructed
    client factors B + dB_i, A + dA_i; weights p_i. Returns (dB, dA); in odd rounds dA is all
    zeros, in even rounds dB is. `efficient=True` is FedSRD-e (no SVD).
    """
    _check_inputs(B, A, client_Bs, client_As, weights, round)
    client_Bs, client_As, weights = list(client_Bs), list(client_As), [float(w) for w in weights]
    if method == "factored":
        return _decompose_factored(B, A, client_Bs, client_As, weights, int(round), efficient)
    if method == "dense":
        return _decompose_dense(B, A, client_Bs, client_As, weights, int(round), efficient)
    raise ValueError(f"decompose: method must be 'factored' or 'dense', got {method!r}")


@dataclass(frozen=True)
class FedSRDConfig(UploadConfig):
    """FedSRD's knobs; defaults are the paper's (and the published code's) values."""

    upload_mask: str = "importance"
    efficient: bool = False
    download_drop: float = 0.8
    method: str = "factored"
    # Extension, off by default (the paper has none): after every applied broadcast, server and
    # clients alike replace (B, A) by balanced factors of the same product (lora.balance_factors).
    # The pinv solves otherwise let one factor grow while the other shrinks, and local optimizers
    # then take steps whose effect on B A scales with that imbalance. Costs no bytes.
    rebalance: bool = False
    # Extension: the least precision of the server step. "float32" is the published code's; "float64"
    # avoids the cancellation in SVD_r(W) - B A when clients' factors nearly agree (the solved
    # delta is cast back to the parameters' dtype, so the wire format does not change).
    server_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, download_drop=(0.0, 0.999))
        choice(self.method, "method", ("factored", "dense"))
        choice(self.server_dtype, "server_dtype", ("float32", "float64"))
        choice(self.upload_mask, "upload_mask", ("none", "importance", "magnitude", "random"))


class FedSRD(Algorithm):
    """FedSRD (and, with `efficient=True`, FedSRD-e). Non-LoRA trained keys are averaged (FedAvg)."""

    name = "fedsrd"
    Config = FedSRDConfig

    def __init__(self, config: FedSRDConfig | None = None) -> None:
        self.config = config or self.Config()

    def client_payload(self, start, trained, info: ClientInfo) -> Payload:
        return sparse_upload(start, trained, self.sent_keys(start), self.config, info)

    def server_broadcast(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Payload],
        num_samples: Sequence[int],
        info: RoundInfo,
    ) -> Payload:
        cfg = self.config
        weights = aggregation_weights(num_samples, cfg.weighting)
        sent = self.sent_keys(global_state)
        out: dict[str, torch.Tensor] = {}
        seeds: dict[str, tuple[int, float]] = {}
        done: set[str] = set()
        for b_key, a_key in lora_pairs({k: global_state[k] for k in sent}).values():
            B, A = global_state[b_key], global_state[a_key]
            work = torch.promote_types(B.dtype, torch.float64 if cfg.server_dtype == "float64" else torch.float32)
            Bs, As = reconstruct(global_state, uploads, b_key), reconstruct(global_state, uploads, a_key)
            dB, dA = decompose(
                B.to(work), A.to(work), [b.to(work) for b in Bs], [a.to(work) for a in As],
                weights, info.round, cfg.efficient, cfg.method,
            )  # fmt: skip
            key, delta = (b_key, dB.to(B.dtype)) if info.round % 2 == 1 else (a_key, dA.to(A.dtype))
            if cfg.download_drop > 0.0:
                seed = derive_seed(info.seed, "download", info.round, key)
                delta = dare(delta, cfg.download_drop, seed)
                seeds[key] = (seed, 1.0 - cfg.download_drop)
            out[key] = delta
            done.update((b_key, a_key))
        for key in sent:  # anything that is not a LoRA factor: plain FedAvg of the deltas
            if key not in done:
                out[key] = mean_delta(global_state, uploads, weights, key)
        return Payload(out, seeds=seeds, meta={"kind": KIND_DELTA, "round": info.round})


    def apply_broadcast(self, state, broadcast: Payload):
        out = super().apply_broadcast(state, broadcast)
        if self.config.rebalance:
            touched = set(broadcast.tensors)
            for b_key, a_key in lora_pairs(out).values():
                if b_key in touched or a_key in touched:
                    B, A = balance_factors(out[b_key], out[a_key])
                    out[b_key], out[a_key] = B.contiguous(), A.contiguous()
        return out


class FedSRDe(FedSRD):
    """FedSRD-e: FedSRD without the SVD projection (target T = W - B A)."""

    name = "fedsrd-e"

    def __init__(self, config: FedSRDConfig | None = None) -> None:
        super().__init__(config or FedSRDConfig(efficient=True))
