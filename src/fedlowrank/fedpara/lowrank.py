"""Conventional low-rank Linear and Conv2d layers with FedPara's parameter budget.

The baseline FedPara is compared with (Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard
Product for Communication-Efficient Federated Learning", ICLR 2022, Sec. 3.1): W = X Y^T with
X: (m, 2R), Y: (n, 2R), i.e. the same 2R(m + n) parameters as a FedPara layer of inner rank R but
rank(W) <= 2R instead of R^2. For kernels the factor is Tucker-2, W = T x_1 X x_2 Y with core
(r, r, k_h, k_w); its single r x r core costs more than FedPara's two R x R cores, so with
``gamma`` the rank r is the largest whose count does not exceed FedPara's (rank.lowrank_rank:
exactly 2R for the matrix form, a little below 2R for Tucker kernels). ``rank=`` sets r directly.
Initialisation: the built weight gets He variance 2 / fan_in (base.py).
"""

from __future__ import annotations

import math

import torch

from .base import FactorisedConv2d, FactorisedLinear, LowRankFactor, he_variance, rescale_to_std
from .rank import resolve_rank

__all__ = ["LowRankLinear", "LowRankConv2d", "SingleFactor"]


class SingleFactor:
    """The low-rank recipe shared by ``LowRankLinear`` and ``LowRankConv2d``: W = w()."""

    def _setup_factors(self, rank, gamma, device, dtype, where: str) -> None:
        out_f, in_f = self._factor_shape()
        self.rank = resolve_rank(out_f, in_f, self.kernel_size, rank=rank, gamma=gamma, layer=where, low_rank=True)
        self.gamma = gamma
        self.w = LowRankFactor(out_f, in_f, self.rank, self.kernel_size, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self, variance: float | None = None, exact_std: bool = True) -> None:
        """Draw the factor so the built weight has ``variance`` (default He, 2 / fan_in); zero bias.

        ``exact_std``: then scale them so this draw's std is exactly sqrt(variance) (base.py).
        """
        target = he_variance(self.fan_in) if variance is None else variance
        self.w.reset_parameters(target)
        tensors = list(self.w.parameters())
        if exact_std:
            rescale_to_std(self.build_weight, tensors, len(tensors), math.sqrt(target))
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def build_weight(self) -> torch.Tensor:  # (O, I) or (O, I, kh, kw)
        return self._as_kernel(self.w())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


class LowRankLinear(SingleFactor, FactorisedLinear):
    """Drop-in for ``nn.Linear`` with W = X Y^T, X: (out, r), Y: (in, r); r(out + in) parameters.

    ``rank`` sets r (in [1, min(in, out)]); ``gamma`` gives r = 2R, R the FedPara rank at gamma.
    Parameters ``w.x``, ``w.y``, ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        where = name or f"LowRankLinear(in_features={in_features}, out_features={out_features})"
        super().__init__(in_features, out_features, bias, device, dtype, name=where)
        self._setup_factors(rank, gamma, device, dtype, where)


class LowRankConv2d(SingleFactor, FactorisedConv2d):
    """Drop-in for ``nn.Conv2d`` (groups=1) with a Tucker-2 kernel W = T x_1 X x_2 Y.

    Core T (r, r, k_h, k_w), X (O, r), Y (I, r): r^2 k^2 + r(O + I) parameters (1x1 kernels:
    X Y^T, r(O + I)). With ``gamma``, r matches FedPara's budget at that gamma (rank.lowrank_rank).
    Parameters ``w.core``, ``w.x``, ``w.y``, ``bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        where = name or f"LowRankConv2d({in_channels}, {out_channels}, kernel_size={kernel_size})"
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype, name=where,
        )  # fmt: skip
        self._setup_factors(rank, gamma, device, dtype, where)
