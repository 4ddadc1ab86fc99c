"""LoRA factor algebra on flat state dicts.

A LoRA module contributes B (d_out x r) and A (r x d_in) with dW = B @ A (the alpha/r scaling is
a constant factor and is left to the model). States are flat `{key: tensor}` dicts such as PEFT's
adapter state dict; `lora_pairs` finds the (B, A) key pairs in them by the `lora_A` / `lora_B`
name parts PEFT uses ("...q_proj.lora_A.weight", "...q_proj.lora_A.default.weight") or ours
("layer0.q.lora_A").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["lora_pairs", "module_name", "State"]

State = dict[str, torch.Tensor]


def module_name(a_key: str) -> str:
    """The module prefix of a lora_A key: 'm.q_proj.lora_A.weight' -> 'm.q_proj'."""
    head, _, _ = a_key.partition("lora_A")
    return head.rstrip(".")


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """module -> (B key, A key) for every LoRA module in `state`, in key order.

    Raises ValueError when a lora_A key has no matching lora_B key (or the reverse), or when the
    shapes do not form B (d_out x r) @ A (r x d_in).
    """
    pairs: dict[str, tuple[str, str]] = {}
    b_keys = {k for k in state if "lora_B" in k}
    for key in state:
        if "lora_A" not in key:
            continue
        b_key = key.replace("lora_A", "lora_B", 1)
        if b_key not in state:
            raise ValueError(f"LoRA key {key!r} has no matching {b_key!r}")
        A, B = state[key], state[b_key]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"LoRA module {module_name(key)!r}: B {tuple(B.shape)} and A {tuple(A.shape)} "
                f"do not form B (d_out x r) @ A (r x d_in)"
            )
        pairs[module_name(key)] = (b_key, key)
        b_keys.discard(b_key)
    if b_keys:
        raise ValueError(f"lora_B keys without a matching lora_A: {sorted(b_keys)[:5]}")
    return pairs


def product_bases(
    X: torch.Tensor, Z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal bases for products X @ G @ Z without forming them.

    X (d_out x q), Z (q x d_in). Householder QR: X = Q_L R_L and Z^T = Q_R R_R, so for any
    core G (q x q), X @ G @ Z = Q_L (R_L G R_R^T) Q_R^T exactly, with Q_L and Q_R orthonormal.
    The SVD of the small core gives the SVD of the product. Householder QR is backward stable
    even when X or Z is rank-deficient or nearly so (clients whose factors almost agree), which a
    Gram / Cholesky route would not be. Cost O((d_out + d_in) q^2).
    Returns (Q_L, R_L, Q_R, R_R).
    """
    Q_L, R_L = torch.linalg.qr(X, mode="reduced")
    Q_R, R_R = torch.linalg.qr(Z.mT, mode="reduced")
    return Q_L, R_L, Q_R, R_R


def truncated_svd_of_sum(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` SVD factors of W = sum_i w_i B_i A_i, never forming W.

    Returns (B_new, A_new) = (U_r sqrt(S_r), sqrt(S_r) V_r^T), FlexLoRA's split (Bai et al. 2024).
    """
    X = torch.cat(Bs, dim=1)  # (d_out, m r)
    Z = torch.cat(As, dim=0)  # (m r, d_in)
    Q_L, R_L, Q_R, R_R = product_bases(X, Z)
    scale = torch.cat([torch.full((B.shape[1],), float(w), dtype=X.dtype, device=X.device) for B, w in zip(Bs, weights, strict=True)])
    core = (R_L * scale[None, :]) @ R_R.mT  # (q_L, q_R)
    return split_core(Q_L, core, Q_R, rank)


def split_core(
    Q_L: torch.Tensor, core: torch.Tensor, Q_R: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` SVD factors (U_r sqrt(S_r), sqrt(S_r) V_r^T) of Q_L @ core @ Q_R^T, for
    orthonormal Q_L and Q_R, from the SVD of the small core; zero-padded to `rank` columns when
    the product has fewer directions (LoRA's shape is kept)."""
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B_new = Q_L @ (U[:, :k] * root[None, :])
    A_new = (root[:, None] * Vh[:k]) @ Q_R.mT
    if k < rank:  # W has fewer than `rank` directions: pad with zeros to keep LoRA's shape
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], rank - k)], dim=1)
        A_new = torch.cat([A_new, A_new.new_zeros(rank - k, A_new.shape[1])], dim=0)
    return B_new, A_new


def product_norm2(L: torch.Tensor, R: torch.Tensor | None) -> float:
    """||L @ R||_F^2 without forming the product, as sum((L^T L) * (R R^T)) (||L||^2 when R is None)."""
    if R is None:
        return float((L * L).sum())
    return float(((L.mT @ L) * (R @ R.mT)).sum())


def balance_factors(B: torch.Tensor, A: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the same product B A with equal spectra: B' = Q_B U S^1/2, A' = S^1/2 V^T Q_A^T.

    B A = Q_B (R_B R_A^T) Q_A^T with QR of B (d_out x r) and A^T (d_in x r), and U S V^T the SVD of
    the r x r core, so B' A' = B A exactly while B'^T B' = A' A'^T = S. Cost O((d_out + d_in) r^2).
    When B A has rank below r (B = 0 at the start, say) the factors are returned unchanged, since
    balancing would zero directions of A that later pinv(A) solves need.
    """
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.mT, mode="reduced")
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT)
    if S.numel() < B.shape[1] or S.numel() == 0 or S[-1] <= rtol * S[0]:
        return B, A
    root = S.sqrt()
    return Q_B @ (U * root[None, :]), (root[:, None] * Vh) @ Q_A.mT
