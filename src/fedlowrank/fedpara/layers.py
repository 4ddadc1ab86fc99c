"""FedPara Linear and Conv2d layers: the weight is a Hadamard product of two low-rank factors.

Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022, Sec. 3.1 (equation numbers not checked against the PDF):

* fully connected (Prop. 1):  W = (X1 Y1^T) * (X2 Y2^T),  X_j: (m, R), Y_j: (n, R);
  2R(m + n) parameters and rank(W) <= R^2 (a rank-2R low-rank layer costs the same);
* convolution (Prop. 3):  W = (T1 x_1 X1 x_2 Y1) * (T2 x_1 X2 x_2 Y2),  T_j: (R, R, k_h, k_w),
  X_j: (O, R), Y_j: (I, R);  2(R^2 k^2 + R(O + I)) parameters;
* optional non-linearity (the paper's extension): W = tanh(W1) * tanh(W2).

``*`` is the element-wise (Hadamard) product. The full weight is rebuilt on every forward, as in
the paper's code. The inner rank comes from ``rank=`` or from the gamma rule in rank.py.
Initialisation gives the built weight He variance 2 / fan_in (base.py explains the rule).
"""

from __future__ import annotations

import math

import torch

from .base import (
    FactorisedConv2d,
    FactorisedLinear,
    LowRankFactor,
    he_variance,
    rescale_to_std,
    tanh_preimage_variance,
)
from .rank import resolve_rank

__all__ = ["FedParaLinear", "FedParaConv2d", "hadamard", "HadamardFactors"]


def hadamard(w1: torch.Tensor, w2: torch.Tensor, nonlinear: bool = False) -> torch.Tensor:
    """W1 * W2, or tanh(W1) * tanh(W2) with ``nonlinear``."""
    if nonlinear:
        return torch.tanh(w1) * torch.tanh(w2)
    return w1 * w2


class HadamardFactors:
    """The FedPara weight recipe shared by ``FedParaLinear`` and ``FedParaConv2d``.

    Mixed into a ``FactorisedLinear`` or ``FactorisedConv2d`` shell: two factors ``w1``, ``w2``
    of inner rank ``self.rank``, combined by ``hadamard``.
    """

    def _setup_factors(self, rank, gamma, nonlinear: bool, device, dtype, where: str) -> None:
        out_f, in_f = self._factor_shape()
        self.rank = resolve_rank(out_f, in_f, self.kernel_size, rank=rank, gamma=gamma, layer=where)
        self.gamma = gamma
        self.nonlinear = bool(nonlinear)
        kw = {"device": device, "dtype": dtype}
        self.w1 = LowRankFactor(out_f, in_f, self.rank, self.kernel_size, **kw)
        self.w2 = LowRankFactor(out_f, in_f, self.rank, self.kernel_size, **kw)
        self.reset_parameters()

    def reset_parameters(self, variance: float | None = None, exact_std: bool = True) -> None:
        """Draw the factors so the built weight has ``variance`` (default He, 2 / fan_in); zero bias.

        ``exact_std``: then scale them so this draw's std is exactly sqrt(variance) (base.py).
        """
        target = he_variance(self.fan_in) if variance is None else variance
        v = math.sqrt(target)  # Var(W1 * W2) = Var(W1) Var(W2)
        if self.nonlinear:
            v = tanh_preimage_variance(v)
        self.w1.reset_parameters(v)
        self.w2.reset_parameters(v)
        tensors = [*self.w1.parameters(), *self.w2.parameters()]
        if exact_std:
            rescale_to_std(self.build_weight, tensors, len(tensors), math.sqrt(target))  # degree 2n
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def build_weight(self) -> torch.Tensor:  # (O, I) or (O, I, kh, kw)
        return self._as_kernel(hadamard(self.w1(), self.w2(), self.nonlinear))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}" + (", nonlinear=True" if self.nonlinear else "")


class FedParaLinear(HadamardFactors, FactorisedLinear):
    """Drop-in for ``nn.Linear`` with W = (X1 Y1^T) * (X2 Y2^T) (FedPara, ICLR 2022, Sec. 3.1).

    Args:
        in_features, out_features, bias: as in ``nn.Linear`` (the bias starts at zero).
        rank: inner rank R; overrides gamma. Must lie in [1, min(in, out)].
        gamma: in [0, 1]; R = ceil((1 - gamma) R_min + gamma R_max) (rank.py).
        nonlinear: W = tanh(X1 Y1^T) * tanh(X2 Y2^T).
        name: how error messages name this layer.

    Parameters ``w1.x`` (out, R), ``w1.y`` (in, R), ``w2.x``, ``w2.y``, ``bias`` (out,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        nonlinear: bool = False,
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        where = name or f"FedParaLinear(in_features={in_features}, out_features={out_features})"
        super().__init__(in_features, out_features, bias, device, dtype, name=where)
        self._setup_factors(rank, gamma, nonlinear, device, dtype, where)


class FedParaConv2d(HadamardFactors, FactorisedConv2d):
    """Drop-in for ``nn.Conv2d`` (groups=1) with a FedPara kernel (ICLR 2022, Sec. 3.1, Prop. 3).

    W = (T1 x_1 X1 x_2 Y1) * (T2 x_1 X2 x_2 Y2): each factor a Tucker-2 tensor with core
    T_j (R, R, k_h, k_w), X_j (O, R), Y_j (I, R); 2(R^2 k^2 + R(O + I)) parameters (+ O bias).
    A 1x1 kernel uses the matrix form X Y^T without a core (2R(O + I)), see rank.py.

    Args as ``nn.Conv2d`` plus ``rank`` (in [1, max(O, I)], or [1, min(O, I)] for 1x1), ``gamma``
    and ``nonlinear`` as in ``FedParaLinear``. Parameters ``w1.core``, ``w1.x``, ``w1.y``,
    ``w2.*`` and ``bias``.
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
        nonlinear: bool = False,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        where = name or f"FedParaConv2d({in_channels}, {out_channels}, kernel_size={kernel_size})"
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype, name=where,
        )  # fmt: skip
        self._setup_factors(rank, gamma, nonlinear, device, dtype, where)
