"""Upload and download sparsification: importance scores, adaptive ratio, masks.

FedSRD (Yan et al., WWW '26), Section 4.1:

* Eq. 6, importance of one delta entry = Frobenius norm of its rank-1 contribution to
  dW = dB.A + B'.dA:  I(dB[u,v]) = |dB[u,v]| * ||A[v,:]||_2 (old A, row v) and
  I(dA[u,v]) = |dA[u,v]| * ||B'[:,u]||_2 (new B, column u).
* Eq. 7, per-matrix sparsity (fraction dropped):
  rho = alpha + min(cap, coeff * ln(max(kurtosis(I), 1))) with Pearson kurtosis (normal = 3),
  as in the published code (the cap bounds the log-kurtosis offset).
* Eq. 8, keep the top-k entries by importance. We keep exactly
  k = max(1, round((1 - rho) * n)) entries with deterministic ties (lower flat index first).

Unbiased importance sampling (our extension, not in the paper): keep entry j with probability
p_j = min(1, c I_j), c chosen so that sum_j p_j = k (the top-k count), kept values scaled by
1 / p_j, so the upload's expectation is the dense delta.

Download (Alg. 1 line 29): DARE, a Bernoulli keep mask drawn from a seed that travels with the
broadcast, kept entries scaled by 1 / keep_prob.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "importance_scores",
    "pearson_kurtosis",
    "adaptive_sparsity",
    "keep_count",
    "topk_mask",
    "seeded_keep_mask",
    "dare",
    "l1_rescale",
    "sampling_probabilities",
    "importance_sample",
    "kept_energy",
]


def importance_scores(
    dB: torch.Tensor, dA: torch.Tensor, B_new: torch.Tensor, A_old: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSRD Eq. 6. Shapes: dB, B_new (d_out, r); dA, A_old (r, d_in). Returns (IB, IA)."""
    if dB.dim() != 2 or dA.dim() != 2 or B_new.shape != dB.shape or A_old.shape != dA.shape:
        raise ValueError(
            f"importance_scores: need dB and B_new of one shape (d_out, r) and dA and A_old of one "
            f"shape (r, d_in); got dB {tuple(dB.shape)}, B_new {tuple(B_new.shape)}, "
            f"dA {tuple(dA.shape)}, A_old {tuple(A_old.shape)}"
        )
    if dB.shape[1] != dA.shape[0]:
        raise ValueError(f"importance_scores: rank mismatch, dB has {dB.shape[1]} columns, dA {dA.shape[0]} rows")
    a_row_norms = torch.linalg.vector_norm(A_old, dim=1)  # (r,)
    b_col_norms = torch.linalg.vector_norm(B_new, dim=0)  # (r,)
    IB = dB.abs() * a_row_norms[None, :]
    IA = dA.abs() * b_col_norms[:, None]
    return IB, IA


def pearson_kurtosis(scores: torch.Tensor) -> float:
    """Pearson kurtosis m4 / m2^2 (a normal sample gives 3), computed in float64.

    A constant input has no spread; we return 1.0 (the smallest possible kurtosis), which makes
    Eq. 7's offset zero.
    """
    x = scores.detach().reshape(-1).to(torch.float64)
    if x.numel() == 0:
        raise ValueError("pearson_kurtosis: empty input")
    c = x - x.mean()
    m2 = (c * c).mean()
    if not torch.isfinite(m2):
        raise ValueError("pearson_kurtosis: scores contain non-finite values")
    if m2.item() == 0.0:
        return 1.0
    m4 = (c**4).mean()
    return float(m4 / (m2 * m2))


def adaptive_sparsity(
    scores: torch.Tensor, alpha: float = 0.85, coeff: float = 0.1, cap: float = 0.11
) -> float:
    """FedSRD Eq. 7: the fraction of one matrix's entries to drop."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"adaptive_sparsity: alpha must lie in [0, 1), got {alpha}")
    if coeff < 0.0:
        raise ValueError(f"adaptive_sparsity: coeff must be >= 0, got {coeff}")
    if cap < 0.0:
        raise ValueError(f"adaptive_sparsity: cap must be >= 0, got {cap}")
    kurt = pearson_kurtosis(scores)
    return alpha + min(cap, coeff * math.log(max(kurt, 1.0)))


def keep_count(n: int, sparsity: float) -> int:
    """Entries kept out of n at the given sparsity: max(1, round((1 - sparsity) * n))."""
    if not 0.0 <= sparsity <= 1.0 or math.isnan(sparsity):
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if n <= 0:
        raise ValueError(f"cannot sparsify an empty tensor (n = {n})")
    return min(n, max(1, round((1.0 - sparsity) * n)))


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping exactly keep_count(n, sparsity) largest scores.

    Ties at the threshold go to the lower flat index, so the mask is deterministic. O(n).
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    k = keep_count(n, sparsity)
    if torch.isnan(flat).any():
        raise ValueError("topk_mask: scores contain NaN")
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k == n:
        mask[:] = True
        return mask.reshape(scores.shape)
    # threshold = k-th largest = (n - k + 1)-th smallest
    thr = torch.kthvalue(flat, n - k + 1).values
    above = flat > thr
    mask |= above
    need = k - int(above.sum())
    if need > 0:
        ties = torch.nonzero(flat == thr, as_tuple=False).reshape(-1)[:need]
        mask[ties] = True
    return mask.reshape(scores.shape)


def seeded_keep_mask(shape: tuple[int, ...] | torch.Size, keep_prob: float, seed: int) -> torch.Tensor:
    """Bernoulli(keep_prob) mask from a seed, identical wherever it is regenerated (CPU generator)."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must lie in (0, 1], got {keep_prob}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2^63), got {seed}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < keep_prob


def dare(t: torch.Tensor, drop_prob: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability drop_prob, rescale the rest.

    The mask is seeded_keep_mask(t.shape, 1 - drop_prob, seed), so a receiver that knows the seed
    knows the positions. `rescale=False` keeps the survivors as they are (a random-k mask: biased,
    but contractive, which error feedback needs).
    """
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"DARE drop probability must lie in [0, 1), got {drop_prob}")
    keep = seeded_keep_mask(t.shape, 1.0 - drop_prob, seed).to(t.device)
    return torch.where(keep, t / (1.0 - drop_prob) if rescale else t, torch.zeros_like(t))


def l1_rescale(dense: torch.Tensor, sparse: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Scale `sparse` so its L1 norm equals `dense`'s (the published FedSRD code's upload option)."""
    s = sparse.abs().sum()
    if s <= eps:
        return sparse
    return sparse * (dense.abs().sum() / s)


def sampling_probabilities(scores: torch.Tensor, k: int) -> torch.Tensor:
    """p_j = min(1, c s_j) with c such that sum_j p_j = k (water-filling over sorted scores).

    Scores must be non-negative and finite. When fewer than k scores are positive, every
    positive score gets p = 1 (and zeros get 0). Computed in float64.
    """
    s = scores.detach().reshape(-1).to(torch.float64)
    if s.numel() == 0:
        raise ValueError("sampling_probabilities: empty scores")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("sampling_probabilities: scores must be finite and non-negative")
    n = s.numel()
    if not 1 <= k <= n:
        raise ValueError(f"sampling_probabilities: k must lie in [1, {n}], got {k}")
    positive = int((s > 0).sum())
    if positive <= k:
        return (s > 0).to(torch.float64).reshape(scores.shape)
    desc = torch.sort(s, descending=True).values
    suffix = torch.flip(torch.cumsum(torch.flip(desc, [0]), 0), [0])  # suffix[j] = sum desc[j:]
    j = torch.arange(n, dtype=torch.float64)
    # the number of clipped entries is the smallest j with (k - j) desc[j] / suffix[j] <= 1; j = k - 1
    # always qualifies, since more than k scores are positive. Compared as a product: the scale
    # (k - j) / suffix[j] overflows for subnormal scores
    ok = ((k - j) * desc <= (1.0 + 1e-12) * suffix) & (j < k)
    jstar = int(torch.nonzero(ok)[0])
    rest = float(suffix[jstar])
    if rest >= torch.finfo(torch.float64).tiny:
        p = (s * ((k - jstar) / rest)).clamp(max=1.0)
    else:  # subnormal: scale by the ratio s / suffix instead
        p = ((k - jstar) * (s / rest)).clamp(max=1.0)
    return p.reshape(scores.shape)


def importance_sample(delta: torch.Tensor, scores: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Keep entry j with probability p_j = sampling_probabilities(scores, k)_j (a seeded draw),
    scaled by 1 / p_j: E[result] = delta wherever p_j > 0. Returns a dense tensor with zeros."""
    p = sampling_probabilities(scores, k)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    u = torch.rand(tuple(delta.shape), generator=gen, dtype=torch.float64)
    keep = u < p
    scale = torch.where(keep, 1.0 / p.clamp_min(1e-300), torch.zeros_like(p))
    return (delta.to(torch.float64) * scale).to(delta.dtype)


def kept_energy(dense: torch.Tensor, sent: torch.Tensor) -> tuple[float, float]:
    """(squared norm of `dense` at the positions `sent` kept, i.e. where it is non-zero, squared
    norm of `dense`), in float64: a mask's kept energy before any rescaling of its survivors."""
    d2 = dense.detach().to(torch.float64) ** 2
    return float(d2[sent != 0].sum()), float(d2.sum())
