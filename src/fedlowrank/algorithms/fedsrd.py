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

Options beyond the paper (all off in `fedsrd` / `fedsrd-e`; docs/algorithms.md measures them):
damped solves (`solve_inverse`: truncated or Tikhonov pseudo-inverse in step 3), unscaled
download masks, server-side error feedback of what the broadcast did not realise (kept as a
rank-2r product in the server's memory), client error feedback and unbiased importance-sampled
uploads (`upload.py`), factor rebalancing, float64 server steps. `fedsrd-plus` combines a damped
solve, rebalancing and sampled uploads.

`decompose(..., method="factored")` never builds a d_out x d_in matrix: W has rank at most m r,
W = X diag(p) Z with X = [B_1..B_m] (d_out x q) and Z = [A_1; ..; A_m] (q x d_in), q = m r.
Householder QR of X and Z^T (Q kept implicit as reflectors) turns the SVD into one of a q x q
core; the target is kept as a product T = L @ R = [Q_L U_r S_r, B] @ [V_r^T Q_R^T; -A] (`target`)
and the solves are L (R pinv(A)) and (pinv(B) L) R (`solve_factor`), so nothing larger than
d x q is built: O((d_out + d_in) q^2) in all. Householder QR stays
backward stable when clients' factors nearly agree (X nearly rank-deficient), where Gram or
Cholesky routes square the condition number. FedSRD-e needs no QR: T = sum_i p_i dB_i A_i +
B (sum_i p_i A_i - A) is already a product of a d_out x q and a q x d_in factor, computed
without the cancellation of W - B A. `method="dense"` is the paper's reference (build W, full
SVD, pinv), kept for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedlowrank.algorithms.aggregation import Aggregator, Collecting, ModuleSketches, aggregate, use_sketch
from fedlowrank.algorithms.base import (
    KIND_DELTA,
    Algorithm,
    RoundInfo,
    State,
    aggregation_weights,
    check_fields,
    derive_seed,
    mean_delta,
    reconstruct,
    weighted_mean,
)
from fedlowrank.algorithms.upload import SparseUploadClient, UploadConfig
from fedlowrank.config import choice
from fedlowrank.lora import balance_factors, lora_pairs, product_norm2, truncated_svd_of_sum
from fedlowrank.payload import Payload
from fedlowrank.sparsify import dare, kept_energy

__all__ = ["FedSRD", "FedSRDConfig", "FedSRDe", "FedSRDPlus", "FedSRDePlus", "PLUS_DEFAULTS", "decompose", "solve_factor", "solve_inverse", "target"]


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


def _target_dense(B, A, client_Bs, client_As, weights, efficient):
    """The paper's target: build W (d_out x d_in), full SVD. Returns (T, None)."""
    r = B.shape[1]
    W = weighted_mean([Bi @ Ai for Bi, Ai in zip(client_Bs, client_As)], weights)
    if efficient:
        return W - B @ A, None
    U, S, Vh = torch.linalg.svd(W)  # the published code's call: full_matrices=True
    k = min(r, S.numel())
    return (U[:, :k] * S[:k]) @ Vh[:k] - B @ A, None


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


def _target_factored(B, A, client_Bs, client_As, weights, efficient):
    """T as a product L @ R, never building a d_out x d_in matrix."""
    r = B.shape[1]
    if efficient:
        # T = W - B A = sum_i p_i dB_i A_i + B (sum_i p_i A_i - A) = X @ Y, with
        # X = [dB_1..dB_m, B] (d_out, q) and Y (q, d_in): no cancellation, no QR.
        X = torch.cat([Bi - B for Bi in client_Bs] + [B], dim=1)
        tail = weighted_mean(client_As, weights) - A
        Y = torch.cat([w * Ai for w, Ai in zip(weights, client_As)] + [tail], dim=0)
        return X, Y
    # FedSRD: W = X diag(p) Z with X = [B_1..B_m] (d_out, q), Z = [A_1; ..; A_m] (q, d_in),
    # q = m r. X = Q_L R_L and Z^T = Q_R R_R (Householder, Q kept implicit), so
    # W = Q_L (R_L diag(p) R_R^T) Q_R^T and SVD_r(W) = Q_L U_r S_r V_r^T Q_R^T from the core's SVD;
    # T = [Q_L U_r S_r, B] @ [V_r^T Q_R^T; -A].
    X = torch.cat(client_Bs, dim=1)
    Z = torch.cat(client_As, dim=0)
    p = torch.cat([torch.full((r,), w, dtype=X.dtype, device=X.device) for w in weights])
    aL, tauL, R_L = _householder(X)
    aR, tauR, R_R = _householder(Z.mT)
    U, S, Vh = torch.linalg.svd((R_L * p[None, :]) @ R_R.mT, full_matrices=False)
    k = min(r, S.numel())
    left = _q_times(aL, tauL, U[:, :k] * S[:k])  # (d_out, k)
    right = _q_times(aR, tauR, Vh[:k].mT).mT  # (k, d_in)
    return torch.cat([left, B], dim=1), torch.cat([right, -A], dim=0)


def target(
    B: torch.Tensor,
    A: torch.Tensor,
    client_Bs: Sequence[torch.Tensor],
    client_As: Sequence[torch.Tensor],
    weights: Sequence[float],
    efficient: bool,
    method: str = "factored",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FedSRD's server target for one module: T = SVD_r(W) - B A (Eq. 10), or W - B A (FedSRD-e),
    W = sum_i p_i B_i A_i (Eq. 9). Returned as (L, R) with T = L @ R (factored, at most
    (m + 1) r columns) or as (T, None) (method "dense", the paper's reference)."""
    if method == "factored":
        return _target_factored(B, A, list(client_Bs), list(client_As), [float(w) for w in weights], efficient)
    if method == "dense":
        return _target_dense(B, A, list(client_Bs), list(client_As), [float(w) for w in weights], efficient)
    raise ValueError(f"decompose: method must be 'factored' or 'dense', got {method!r}")


SOLVES = ("pinv", "truncated", "tikhonov")


def solve_inverse(M: torch.Tensor, solve: str = "pinv", tol: float = 0.0,
                  svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The (damped) pseudo-inverse of a factor M used by the alternating solves.

    "pinv": the paper's Moore-Penrose pseudo-inverse (torch's default cut-off: singular values
    at or below max(rows, cols) * eps * s_max are dropped).
    "truncated": singular values below tol * s_max are dropped (equal to pinv when every
    singular value is above the cut-off). "tikhonov": regularised least squares,
    s / (s^2 + (tol s_max)^2) in place of 1 / s: within a relative (tol s_max / s_min)^2 of
    pinv on well-conditioned input, and never more than 1 / (2 tol s_max) on any direction.
    `svd`: M's thin SVD (U, S, Vh) with every direction, where the caller already has it (the
    sketched step's bases): the same inverse, to rounding, without a second SVD of M.
    """
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    if solve == "pinv" and svd is None:
        return torch.linalg.pinv(M)
    U, S, Vh = svd if svd is not None else torch.linalg.svd(M, full_matrices=False)
    smax = S.max() if S.numel() else S.new_zeros(())
    if smax <= 0:
        return torch.zeros_like(M.mT)
    if solve == "tikhonov":
        inv = S / (S * S + (tol * smax) ** 2)
    else:
        cut = tol * smax if solve == "truncated" else max(M.shape) * torch.finfo(M.dtype).eps * smax
        inv = torch.where(S > cut, 1.0 / S.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S))
    return Vh.mT @ (inv[:, None] * U.mT)


def solve_factor(
    L: torch.Tensor, R: torch.Tensor | None, B: torch.Tensor, A: torch.Tensor, round: int,
    solve: str = "pinv", tol: float = 0.0, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Eq. 12-13: odd rounds dB = T pinv(A), dA = 0; even rounds dA = pinv(B) T, dB = 0; T = L @ R
    (or L itself when R is None). O((d_out + d_in) q r) for a factored T of q columns. `svd`: the
    thin SVD of the factor solved against (A in odd rounds, B in even ones), if already known."""
    if round % 2 == 1:
        P = solve_inverse(A, solve, tol, svd)  # (d_in, r)
        return (L @ P if R is None else L @ (R @ P)), torch.zeros_like(A)
    P = solve_inverse(B, solve, tol, svd)  # (r, d_out)
    return torch.zeros_like(B), (P @ L if R is None else (P @ L) @ R)


def decompose(
    B: torch.Tensor,
    A: torch.Tensor,
    client_Bs: Sequence[torch.Tensor],
    client_As: Sequence[torch.Tensor],
    weights: Sequence[float],
    round: int,
    efficient: bool,
    method: str = "factored",
    solve: str = "pinv",
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSRD's server update of one LoRA module before download sparsification.

    B (d_out, r), A (r, d_in): the global factors; client_Bs / client_As: the reconstructed
    client factors B + dB_i, A + dA_i; weights p_i. Returns (dB, dA); in odd rounds dA is all
    zeros, in even rounds dB is. `efficient=True` is FedSRD-e (no SVD). `solve` / `tol` pick the
    pseudo-inverse (`solve_inverse`; "pinv" is the paper's).
    """
    _check_inputs(B, A, client_Bs, client_As, weights, round)
    L, R = target(B, A, client_Bs, client_As, weights, efficient, method)
    return solve_factor(L, R, B, A, int(round), solve, tol)


@dataclass(frozen=True)
class FedSRDConfig(UploadConfig):
    """FedSRD's knobs; defaults are the paper's (and the published code's) values."""

    upload_mask: Literal["none", "importance", "magnitude", "random", "importance-sampled"] = "importance"
    # FedSRD-e: target T = W - B A instead of SVD_r(W) - B A (no SVD)
    efficient: bool = False
    # DARE drop probability on the broadcast factor, in [0, 0.999]; 0 sends the dense solved factor
    download_drop: float = 0.8
    # The server step. "factored": exact, through the clients' factors (O((d_out + d_in) (m r)^2));
    # "dense": the paper's reference (build W, full SVD); "sketch": streaming, each upload folded
    # into per-module sums and let go (fedlowrank.sketch: exact on everything the clients' deltas do
    # inside the spans of the global factors, its broadcast factor within 1e-3 of the exact one in the measured regime);
    # "auto": "factored" while clients x rank <= sketch_above or the exact step is cheap anyway
    # (small modules: its QR work under ~1.7e10 and the decoded uploads under 1 GiB), "sketch" beyond.
    method: Literal["auto", "factored", "dense", "sketch"] = "auto"
    # where method = "auto" switches from "factored" to "sketch": clients x LoRA rank above this
    sketch_above: int = 512
    # Columns of a random sketch of what the cross approximation leaves out (0: none; m r or more:
    # the sketch step equals the exact one). docs/algorithms.md measures it.
    sketch_width: int = 0
    # Which side of the target the sketch streams. An Eq. 12-13 solve reads one side only (odd
    # rounds T pinv(A): T V; even rounds pinv(B) T: U^T T), so "solve" streams that side alone,
    # half the per-upload products, with the same first-order accuracy for the solved factor
    # (fedlowrank.sketch); "both" streams both (the whole target to first order). "auto": "solve"
    # unless download_feedback, which reads the whole target, or sketch_width > 0.
    sketch_sides: Literal["auto", "both", "solve"] = "auto"
    # Extension, off by default (the paper has none): after every applied broadcast, server and
    # clients alike replace (B, A) by balanced factors of the same product (lora.balance_factors).
    # The pinv solves otherwise let one factor grow while the other shrinks, and local optimizers
    # then take steps whose effect on B A scales with that imbalance. Costs no bytes.
    rebalance: bool = False
    # Extension: the least precision of the server step. "float32" is the published code's; "float64"
    # avoids the cancellation in SVD_r(W) - B A when clients' factors nearly agree (the solved
    # delta is cast back to the parameters' dtype, so the wire format does not change).
    server_dtype: Literal["float32", "float64"] = "float32"
    # Extension: the pseudo-inverse of Eq. 12-13. "pinv" is the paper's; "truncated" drops
    # singular values below solve_tol * s_max, "tikhonov" damps them (solve_inverse), so a nearly
    # singular factor cannot turn a small target into a huge delta.
    solve: Literal["pinv", "truncated", "tikhonov"] = "pinv"
    # the damped solves' cut-off relative to the factor's largest singular value, in [1e-12, 1]
    solve_tol: float = 0.05
    # Extension: server-side error feedback on the download. What the broadcast does not realise of
    # the target (the entries the download mask dropped, and what one factor cannot express) is
    # kept by the server, as a rank <= 2r product, and added to the next round's target. No bytes;
    # the global state stays exactly what the clients hold.
    download_feedback: bool = False
    # The paper scales the survivors of the download mask by 1 / (1 - download_drop) (DARE). False
    # sends them unscaled: a biased but contractive mask, which error feedback needs (DARE's error
    # is twice the delta's norm at drop 0.8, so feeding it back grows without bound).
    download_rescale: bool = True
    # Per-round diagnostics in the round records (factor norms, conditioning, energy kept,
    # realisation error): cheap for FedSRD, O(d q^2) for FedSRD-e with q = (m + 1) r.
    diagnostics: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, download_drop=(0.0, 0.999), solve_tol=(1e-12, 1.0))
        choice(self.method, "method", METHODS)
        check_fields(self, sketch_above=(0, 10**9), sketch_width=(0, 10**6))
        choice(self.sketch_sides, "sketch_sides", ("auto", "both", "solve"))
        if self.sketch_sides == "solve" and (self.download_feedback or self.sketch_width):
            raise ValueError("sketch_sides = 'solve' streams one side of the target, but "
                             + ("download_feedback reads it whole" if self.download_feedback else
                                f"sketch_width = {self.sketch_width} sketches both sides")
                             + ": use sketch_sides = 'both' or 'auto'")  # fmt: skip
        choice(self.server_dtype, "server_dtype", ("float32", "float64"))
        choice(self.solve, "solve", SOLVES)


METHODS = ("auto", "factored", "dense", "sketch")


def _feedback_keys(module: str) -> tuple[str, str]:
    return f"{module}.download_feedback_L", f"{module}.download_feedback_R"


class FedSRD(SparseUploadClient, Algorithm):
    """FedSRD (Yan et al., WWW '26): importance-sparse LoRA uploads, aggregation in full-rank
    space, a sparse one-factor download (with `efficient=True`, FedSRD-e).

    Non-LoRA trained keys are averaged (FedAvg).

    The options beyond the paper (rebalance, server_dtype, solve, download_feedback,
    download_rescale, upload_feedback, upload_mask "importance-sampled") are off by default;
    `fedsrd-plus` turns on the combination docs/algorithms.md measures.
    """

    name = "fedsrd"
    Config = FedSRDConfig
    defaults: dict = {}

    def __init__(self, config: FedSRDConfig | None = None) -> None:
        self.config = config or self.Config(**self.defaults)

    def server_broadcast(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Payload],
        num_samples: Sequence[int],
        info: RoundInfo,
    ) -> Payload:
        if self.config.download_feedback:
            raise ValueError("download_feedback keeps server memory: call server_step, not server_broadcast")
        return self.server_step(global_state, uploads, num_samples, info, {})[0]

    def server_step(self, global_state, uploads, num_samples, info: RoundInfo, memory: State) -> tuple[Payload, State]:
        return aggregate(self.aggregator(global_state, num_samples, info, memory), uploads)

    def sketched(self, global_state: Mapping[str, torch.Tensor], clients: int) -> bool:
        """Whether this round's step is the streaming sketch (`aggregation.use_sketch`)."""
        return use_sketch(self.config.method, global_state, self.sent_keys(global_state), clients, self.config.sketch_above)

    def _work(self, t: torch.Tensor) -> torch.dtype:
        return torch.promote_types(t.dtype, torch.float64 if self.config.server_dtype == "float64" else torch.float32)

    def aggregator(self, global_state, num_samples, info: RoundInfo, memory: State) -> Aggregator:
        weights = aggregation_weights(num_samples, self.config.weighting)
        if self.sketched(global_state, len(num_samples)):
            return _SketchStep(self, global_state, weights, info, memory)
        return Collecting(lambda uploads: self._exact_step(global_state, uploads, weights, info, memory))

    def _exact_step(self, global_state, uploads, weights, info: RoundInfo, memory: State) -> tuple[Payload, State]:
        """The batch step: every client's reconstructed factors at once (factored or dense target)."""
        cfg = self.config
        step = _Step(self, global_state, info, memory)
        for module, (b_key, a_key) in step.pairs.items():
            B0, A0 = global_state[b_key], global_state[a_key]
            work = self._work(B0)
            B, A = B0.to(work), A0.to(work)
            Bs = [b.to(work) for b in reconstruct(global_state, uploads, b_key)]
            As = [a.to(work) for a in reconstruct(global_state, uploads, a_key)]
            _check_inputs(B, A, Bs, As, weights, info.round)
            L, R = target(B, A, Bs, As, weights, cfg.efficient, cfg.method if cfg.method == "dense" else "factored")
            step.module(module, B, A, L, R)
        for key in step.sent:  # anything that is not a LoRA factor: plain FedAvg of the deltas
            if key not in step.done:
                step.out[key] = mean_delta(global_state, uploads, weights, key)
        return step.finish()

    def apply_broadcast(self, state, broadcast: Payload):
        out = super().apply_broadcast(state, broadcast)
        # A full-state catch-up carries the server's factors as they are (already balanced):
        # rebalancing them again would not give the same bits (SVD signs), so it is skipped.
        if self.config.rebalance and broadcast.meta.get("kind", KIND_DELTA) == KIND_DELTA:
            touched = set(broadcast.tensors)
            for b_key, a_key in lora_pairs(out).values():
                if b_key in touched or a_key in touched:
                    B, A = balance_factors(out[b_key], out[a_key])
                    out[b_key], out[a_key] = B.contiguous(), A.contiguous()
        return out


class _Step:
    """What one FedSRD server step builds, module by module: given a module's target T = L @ R,
    the Eq. 12-13 solve, DARE, the download error feedback and the diagnostics (shared by the
    exact and the sketched steps)."""

    def __init__(self, alg: FedSRD, global_state, info: RoundInfo, memory: State) -> None:
        self.cfg, self.info, self.memory = alg.config, info, memory
        self.global_state = global_state
        self.sent = alg.sent_keys(global_state)
        self.pairs = lora_pairs({k: global_state[k] for k in self.sent})
        self.odd = info.round % 2 == 1
        self.out: dict[str, torch.Tensor] = {}
        self.seeds: dict[str, tuple[int, float]] = {}
        self.new_memory: State = {}
        self.done: set[str] = set()
        self.diag = _Diagnostics() if self.cfg.diagnostics else None

    def module(self, module: str, B: torch.Tensor, A: torch.Tensor, L: torch.Tensor, R: torch.Tensor | None,
               factor_svd=None, target2: float | None = None) -> None:  # fmt: skip
        """One module's solve and what follows it. `factor_svd`: the thin SVD of the factor this
        round solves against, if the caller has it; `target2`: ||L @ R||^2, likewise."""
        cfg, info, odd, diag, memory = self.cfg, self.info, self.odd, self.diag, self.memory
        b_key, a_key = self.pairs[module]
        B0, A0 = self.global_state[b_key], self.global_state[a_key]
        work = B.dtype
        if R is None and (cfg.download_feedback or diag is not None):
            R = torch.eye(A.shape[1], dtype=work, device=A.device)  # dense T = T @ I
        fb_L, fb_R = _feedback_keys(module)
        if cfg.download_feedback and fb_L in memory:
            L = torch.cat([L, memory[fb_L].to(work)], dim=1)
            R = torch.cat([R, memory[fb_R].to(work)], dim=0)
            target2 = None
        dB, dA = solve_factor(L, R, B, A, info.round, cfg.solve, cfg.solve_tol, factor_svd)
        key, delta = (b_key, dB.to(B0.dtype)) if odd else (a_key, dA.to(A0.dtype))
        solved = delta
        if cfg.download_drop > 0.0:
            seed = derive_seed(info.seed, "download", info.round, key)
            delta = dare(delta, cfg.download_drop, seed, rescale=cfg.download_rescale)
            self.seeds[key] = (seed, 1.0 - cfg.download_drop)
        self.out[key] = delta
        self.done.update((b_key, a_key))
        if cfg.download_feedback or diag is not None:
            d = delta.to(work)
            # what is left of T after the broadcast: T - dB' A (odd) or T - B dA' (even)
            res_L = torch.cat([L, -d], dim=1) if odd else torch.cat([L, -B], dim=1)
            res_R = torch.cat([R, A], dim=0) if odd else torch.cat([R, d], dim=0)
            if diag is not None:
                t2 = target2 if target2 is not None else product_norm2(L, R)
                spectrum = factor_svd[1] if factor_svd is not None else None
                diag.add(B, A, odd, solved, d, t2, product_norm2(res_L, res_R), spectrum)
            if cfg.download_feedback:
                keep_L, keep_R = truncated_svd_of_sum([res_L], [res_R], [1.0], 2 * B.shape[1])
                self.new_memory[fb_L], self.new_memory[fb_R] = keep_L.to(B0.dtype).contiguous(), keep_R.to(A0.dtype).contiguous()

    def finish(self, extra: Mapping[str, float] | None = None) -> tuple[Payload, State]:
        stats = self.diag.summary() if self.diag is not None else {}
        if self.diag is not None and extra:
            stats.update(extra)
        meta = {"kind": KIND_DELTA, "round": self.info.round}
        return Payload(self.out, seeds=self.seeds, meta=meta, stats=stats), self.new_memory


def _sketch_sides(cfg: FedSRDConfig, round: int) -> str:
    """The `ProductSketch` side this round's sketch streams: "right" (E V) for an odd round's
    T pinv(A), "left" (U^T E) for an even round's pinv(B) T, or "both"."""
    one_side = cfg.sketch_sides == "solve" or (
        cfg.sketch_sides == "auto" and not cfg.download_feedback and not cfg.sketch_width)
    if not one_side:
        return "both"
    return "right" if round % 2 == 1 else "left"


class _SketchStep(Aggregator):
    """The streaming FedSRD step: each upload is folded into one `ProductSketch` per module
    (fedlowrank.sketch) and let go; at the end each module's target comes from the sketch:
    SVD_r of the approximated W, minus B A (FedSRD), or the approximated W - B A (FedSRD-e)."""

    keeps_uploads = False  # each upload is folded into the sketches and let go

    def __init__(self, alg: FedSRD, global_state, weights, info: RoundInfo, memory: State) -> None:
        self.alg, self.info, self.memory, self.global_state = alg, info, memory, global_state
        cfg = alg.config
        self.sides = _sketch_sides(cfg, info.round)
        self.sums = ModuleSketches(global_state, alg.sent_keys(global_state), weights, info.seed, info.round,
                                   alg._work, cfg.sketch_width, self.sides)  # fmt: skip

    def add(self, upload: Payload) -> None:
        self.sums.add(upload)

    def finish(self) -> tuple[Payload, State]:
        self.sums.check_complete()
        cfg = self.alg.config
        step = _Step(self.alg, self.global_state, self.info, self.memory)
        errors = []
        for module, sk in self.sums.sketches.items():
            B, A = sk.B, sk.A
            if cfg.efficient:  # T = W - B A directly; its solve is exact when B and A have full rank
                L, R = sk.factors(difference=True)
                t2 = None
            else:  # T = SVD_r(W) - B A
                left, right = sk.truncated_svd(B.shape[1])
                L, R = torch.cat([left, B], dim=1), torch.cat([right, -A], dim=0)
                t2 = product_norm2(L, R)
                errors.append(sk.first_order_error(left, right, t2))
            step.module(module, B, A, L, R, sk.factor_svd("A" if step.odd else "B"), t2)
        for key, acc in self.sums.means.sums.items():
            step.out[key] = acc
        stats = {"sketched": 1.0, "sketch_error_max": max(errors, default=0.0), "sketch_one_side": float(self.sides != "both")}
        return step.finish(stats)


class _Diagnostics:
    """Per-round facts of the server step, summed or maxed over LoRA modules (docs/algorithms.md)."""

    def __init__(self) -> None:
        self.b_norm = self.a_norm = self.cond = self.step = 0.0
        self.solved2 = self.kept2 = self.target2 = self.residual2 = 0.0

    def add(self, B, A, odd, solved, sent, target2, residual2, spectrum=None) -> None:
        """`spectrum`: the singular values of the factor solved against, if known."""
        nb, na = float(torch.linalg.matrix_norm(B)), float(torch.linalg.matrix_norm(A))
        self.b_norm, self.a_norm = max(self.b_norm, nb), max(self.a_norm, na)
        s = spectrum if spectrum is not None else torch.linalg.svdvals(A if odd else B)
        if s.numel() and float(s.max()) > 0:
            smax, smin = float(s.max()), float(s.min())
            self.cond = max(self.cond, min(1e30, smax / smin) if smin > 0 else 1e30)
        factor = na if odd else nb
        if factor > 0:
            self.step = max(self.step, float(torch.linalg.matrix_norm(sent)) / factor)
        kept2, solved2 = kept_energy(solved, sent)
        self.kept2 += kept2
        self.solved2 += solved2
        self.target2 += target2
        self.residual2 += max(residual2, 0.0)

    def summary(self) -> dict[str, float]:
        return {
            "B_norm_max": self.b_norm,
            "A_norm_max": self.a_norm,
            "solve_cond_max": self.cond,
            "step_rel_max": self.step,
            "download_kept_energy": self.kept2 / self.solved2 if self.solved2 > 0 else 1.0,
            "realisation_error": (self.residual2 / self.target2) ** 0.5 if self.target2 > 0 else 0.0,
        }


class FedSRDe(FedSRD):
    """FedSRD-e: FedSRD without the SVD projection (target T = W - B A)."""

    name = "fedsrd-e"
    defaults = {"efficient": True}


# The combination benchmarks/fedsrd_stability.py measured best (docs/algorithms.md, "fedsrd-plus").
PLUS_DEFAULTS: dict = {
    "solve": "tikhonov",
    "rebalance": True,
    "upload_mask": "importance-sampled",
}


class FedSRDPlus(FedSRD):
    """fedsrd-plus: FedSRD's byte budget with a damped (Tikhonov) solve, factor rebalancing and
    unbiased importance-sampled uploads (ours, not the paper's method).

    PLUS_DEFAULTS holds the options; `fedsrd` is the paper's method. docs/algorithms.md says
    what differs and what it measured."""

    name = "fedsrd-plus"
    defaults = dict(PLUS_DEFAULTS)


class FedSRDePlus(FedSRD):
    """fedsrd-e-plus: FedSRD-e (no SVD) with fedsrd-plus's options."""

    name = "fedsrd-e-plus"
    defaults = {"efficient": True, **PLUS_DEFAULTS}
