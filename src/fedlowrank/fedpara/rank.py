"""Inner-rank rule and parameter counts for FedPara and its same-budget low-rank baseline.

Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022 (arXiv 2108.06098), Sec. 3: the inner rank R of every FedPara
layer is interpolated between the smallest rank that can reach full rank and the largest rank
that is not more expensive than the original layer,

    R = ceil((1 - gamma) * R_min + gamma * R_max),
    R_min = min(ceil(sqrt(O)), ceil(sqrt(I))),
    R_max = the largest R whose FedPara parameter count <= the original layer's (O * I * k_h * k_w).

This is the reading that reproduces the paper's VGG16 sizes (docs/fedpara.md); the official
notebook's "ratio" knob is a different rule.

Parameter counts (O = out, I = in, k^2 = k_h * k_w):

* dense:           O * I * k^2
* FedPara matrix:  2 R (O + I)                      (Linear, and convolutions with a 1x1 kernel)
* FedPara Tucker:  2 (R^2 k^2 + R (O + I))           (convolutions with k^2 > 1)
* low-rank matrix: r (O + I);   low-rank Tucker: r^2 k^2 + r (O + I)

A 1x1 kernel's Tucker core would be an R x R matrix that X already absorbs
(T x_1 X x_2 Y = (X T) Y^T), so 1x1 convolutions use the matrix form: that keeps
``kernel_size=1`` meaning one thing here, whether the layer is a Linear or a 1x1 Conv2d.

gamma is read as the decimal number it prints as (``Fraction(repr(gamma))``), so that e.g.
``gamma=0.4`` with R_min = 10, R_max = 20 gives exactly 14 and not ceil(14.000000000000002) = 15.
Biases are not part of these counts; the layers add O for a bias.
"""

from __future__ import annotations

import math
from fractions import Fraction
from numbers import Real

__all__ = [
    "kernel_area",
    "dense_param_count",
    "fedpara_param_count",
    "lowrank_param_count",
    "rank_bounds",
    "max_explicit_rank",
    "fedpara_rank",
    "lowrank_rank",
    "resolve_rank",
]


def _describe(layer: str | None, out_features: int, in_features: int, k2: int) -> str:
    if layer:
        return f"layer {layer!r}"
    shape = f"{out_features}x{in_features}" + (f", kernel area {k2}" if k2 > 1 else "")
    return f"layer ({shape})"


def kernel_area(kernel_size: int | tuple[int, ...]) -> int:
    """k_h * k_w for an int or a pair (1 for a Linear layer)."""
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"kernel_size must be a positive int or a pair of them, got {kernel_size!r}")
    return ks[0] * ks[1]


def _check_dims(out_features: int, in_features: int) -> None:
    for label, v in (("out_features", out_features), ("in_features", in_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}")


def dense_param_count(out_features: int, in_features: int, kernel_size: int | tuple[int, int] = 1) -> int:
    """Weights of the original (dense) layer: O * I * k^2."""
    _check_dims(out_features, in_features)
    return out_features * in_features * kernel_area(kernel_size)


def fedpara_param_count(
    out_features: int, in_features: int, rank: int, kernel_size: int | tuple[int, int] = 1
) -> int:
    """Weights of a FedPara layer of inner rank R: 2R(O+I), or 2(R^2 k^2 + R(O+I)) for k^2 > 1."""
    _check_dims(out_features, in_features)
    k2 = kernel_area(kernel_size)
    core = rank * rank * k2 if k2 > 1 else 0
    return 2 * (core + rank * (out_features + in_features))


def lowrank_param_count(
    out_features: int, in_features: int, rank: int, kernel_size: int | tuple[int, int] = 1
) -> int:
    """Weights of a conventional low-rank layer of rank r: r(O+I), or r^2 k^2 + r(O+I) for k^2 > 1."""
    _check_dims(out_features, in_features)
    k2 = kernel_area(kernel_size)
    core = rank * rank * k2 if k2 > 1 else 0
    return core + rank * (out_features + in_features)


def _ceil_sqrt(n: int) -> int:
    return math.isqrt(n - 1) + 1


def _largest_rank_within(count, budget: int, start: float) -> int:
    """Largest r >= 0 with count(r) <= budget, for count increasing in r; start is a guess."""
    r = max(0, int(start))
    while r > 0 and count(r) > budget:
        r -= 1
    while count(r + 1) <= budget:
        r += 1
    return r


def rank_bounds(
    out_features: int, in_features: int, kernel_size: int | tuple[int, int] = 1
) -> tuple[int, int]:
    """(R_min, R_max) of the rank rule. R_max may be below R_min (tiny layers) or 0."""
    _check_dims(out_features, in_features)
    k2 = kernel_area(kernel_size)
    r_min = min(_ceil_sqrt(out_features), _ceil_sqrt(in_features))
    budget = out_features * in_features * k2
    s = out_features + in_features
    if k2 > 1:  # positive root of k^2 R^2 + (O+I) R - O I k^2 / 2 = 0
        guess = (-s + math.sqrt(s * s + 2 * k2 * budget)) / (2 * k2)
    else:  # 2 R (O+I) <= O I
        guess = budget / (2 * s)
    r_max = _largest_rank_within(
        lambda r: fedpara_param_count(out_features, in_features, r, kernel_size), budget, guess
    )
    return r_min, r_max


def max_explicit_rank(out_features: int, in_features: int, kernel_size: int | tuple[int, int] = 1) -> int:
    """Largest rank a layer accepts: min(O, I) for the matrix form, max(O, I) for Tucker.

    Past it a factor cannot gain rank: X Y^T has rank <= min(O, I); a Tucker factor's mode-1
    and mode-2 unfoldings have rank <= min(O, R) and min(I, R).
    """
    _check_dims(out_features, in_features)
    if kernel_area(kernel_size) > 1:
        return max(out_features, in_features)
    return min(out_features, in_features)


def _check_gamma(gamma, where: str) -> Fraction:
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not math.isfinite(float(gamma)):
        raise ValueError(f"{where}: gamma must be a real number in [0, 1], got {gamma!r}")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"{where}: gamma must lie in [0, 1], got {gamma!r}")
    return Fraction(repr(float(gamma)))


def fedpara_rank(
    out_features: int,
    in_features: int,
    gamma: float,
    kernel_size: int | tuple[int, int] = 1,
    *,
    layer: str | None = None,
) -> int:
    """FedPara inner rank R = ceil((1 - gamma) R_min + gamma R_max), at least 1.

    ``layer`` names the layer in error messages. gamma must lie in [0, 1].
    """
    _check_dims(out_features, in_features)
    k2 = kernel_area(kernel_size)
    g = _check_gamma(gamma, _describe(layer, out_features, in_features, k2))
    r_min, r_max = rank_bounds(out_features, in_features, kernel_size)
    return max(1, math.ceil((1 - g) * r_min + g * r_max))


def lowrank_rank(
    out_features: int,
    in_features: int,
    gamma: float,
    kernel_size: int | tuple[int, int] = 1,
    *,
    layer: str | None = None,
) -> int:
    """Rank of the conventional low-rank layer with the same budget as FedPara at this gamma.

    The largest r whose low-rank count does not exceed the FedPara layer's. For the matrix form
    that is exactly 2R (same count); for Tucker kernels the r x r core costs more than FedPara's
    two R x R cores, so r is somewhat below 2R (e.g. 86 against 2R = 104 for 512->512 3x3 at
    gamma = 0.1).
    """
    R = fedpara_rank(out_features, in_features, gamma, kernel_size, layer=layer)
    budget = fedpara_param_count(out_features, in_features, R, kernel_size)
    r = _largest_rank_within(
        lambda r: lowrank_param_count(out_features, in_features, r, kernel_size), budget, 2 * R
    )
    return max(1, min(r, max_explicit_rank(out_features, in_features, kernel_size)))


def resolve_rank(
    out_features: int,
    in_features: int,
    kernel_size: int | tuple[int, int] = 1,
    *,
    rank: int | None = None,
    gamma: float | None = None,
    layer: str | None = None,
    low_rank: bool = False,
) -> int:
    """The rank a layer uses: ``rank`` if given (range-checked), else the gamma rule.

    ``low_rank=True`` gives the same-budget rank of the conventional low-rank baseline.
    """
    _check_dims(out_features, in_features)
    k2 = kernel_area(kernel_size)
    where = _describe(layer, out_features, in_features, k2)
    if rank is not None:
        hi = max_explicit_rank(out_features, in_features, kernel_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= hi:
            raise ValueError(f"{where}: rank must be an int in [1, {hi}], got {rank!r}")
        return rank
    if gamma is None:
        raise ValueError(f"{where}: give rank= or gamma= (gamma in [0, 1])")
    rule = lowrank_rank if low_rank else fedpara_rank
    return rule(out_features, in_features, gamma, kernel_size, layer=layer)
