"""Shared machinery of the factorised layers: one low-rank factor, the init rule, the shells.

A *factor* is X Y^T (matrix form) or T x_1 X x_2 Y (Tucker-2 form, for k_h * k_w > 1 kernels):

    X: (O, R)   output factor
    Y: (I, R)   input factor
    T: (R, R, k_h, k_w)   core, Tucker form only

FedPara (Hyeon-Woo, Ye-Bin, Oh, ICLR 2022) multiplies two such factors element-wise, pFedPara
uses W1 * (W2 + 1), and the conventional low-rank baseline uses one factor of rank 2R. The
layers in layers.py, pfedpara.py and lowrank.py only say how their factors combine; the
plumbing of a Linear or a Conv2d (bias, stride, padding, ...) lives here once.

Initialisation (the paper's code comments that init "affects the convergence stability"):
every stored tensor of a factor is drawn i.i.d. N(0, s^2) with one s per factor, chosen so that
the *built* weight has He variance 2 / fan_in (fan_in = I * k_h * k_w). A factor whose entries
sum ``terms`` products of ``n`` independent draws (terms = R, n = 2 for X Y^T; terms = R^2,
n = 3 for Tucker) has variance terms * s^(2n), so s = (v / terms)^(1 / (2n)) gives variance v.
The layers pick v per factor: FedPara v = sqrt(2 / fan_in) for each factor (the Hadamard
product of independent zero-mean factors multiplies variances), pFedPara solves v (1 + v) =
2 / fan_in, the low-rank baseline v = 2 / fan_in. With the tanh option each factor is drawn
with the larger variance whose tanh has variance v (``tanh_preimage_variance``).

That makes the *expected* variance He's, but a small layer's weight is a function of few
numbers (VGG's first conv, 3 -> 64 at R = 3, hangs on a 3 x 3 Y per factor), so one draw can be
far off: for that layer 14% of draws came out below half He's std. So after the draw the
factors are scaled (all by one constant, which keeps their balance) until the built weight's
empirical std is exactly the target (``rescale_to_std``); larger layers move by a few percent.

Fan-in He init on the stored tensors instead (the official notebook) leaves the built weight
about 60x too small at 256 -> 256 (the product of four fan-in-scaled factors shrinks with
every factor), and training stalls.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .rank import kernel_area

__all__ = [
    "LowRankFactor",
    "FactorisedLinear",
    "FactorisedConv2d",
    "he_variance",
    "tanh_preimage_variance",
    "rescale_to_std",
]


def he_variance(fan_in: int) -> float:
    """He (Kaiming, ReLU gain) variance of a dense weight: 2 / fan_in."""
    return 2.0 / fan_in


_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)  # for E[f(Z)], Z ~ N(0, 1)


def tanh_preimage_variance(variance: float) -> float:
    """s^2 with E[tanh(Z)^2] = variance for Z ~ N(0, s^2): the factor variance that survives tanh.

    The built factors are treated as Gaussian (they are sums of R or R^2 products, so close to it
    for all but the smallest ranks). |tanh| < 1, so targets above 0.9 (fan_in <= 4 under He)
    are capped at 0.9.
    """
    if not variance > 0.0:
        raise ValueError(f"tanh_preimage_variance: variance must be positive, got {variance}")
    variance = min(variance, 0.9)

    def second_moment(s2: float) -> float:
        return float(np.dot(_GH_WEIGHTS, np.tanh(math.sqrt(s2) * _GH_NODES) ** 2) / math.sqrt(2 * math.pi))

    lo, hi = variance, 1.0
    while second_moment(hi) < variance:
        hi *= 2.0
    for _ in range(100):  # bisection; second_moment increases with s2
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if second_moment(mid) < variance else (lo, mid)
    return 0.5 * (lo + hi)


@torch.no_grad()
def rescale_to_std(build, tensors: list[torch.Tensor], degree: int, target_std: float, iters: int = 20) -> None:
    """Scale ``tensors`` in place until ``build()`` has empirical std ``target_std``.

    ``build()`` must be homogeneous of ``degree`` in ``tensors`` (scaling all of them by c scales
    it by c^degree); then one step is exact. With tanh it is only nearly so, hence a few steps.
    """
    for _ in range(iters):
        w = build()
        if w.numel() < 2:
            return
        s = w.std().item()
        if not (s > 0 and math.isfinite(s)) or abs(s / target_std - 1.0) < 1e-6:
            return
        c = (target_std / s) ** (1.0 / degree)
        for t in tensors:
            t.mul_(c)


class LowRankFactor(nn.Module):
    """One factor X Y^T of shape (O, I), or T x_1 X x_2 Y of shape (O, I, k_h, k_w).

    Parameters: ``x`` (O, R), ``y`` (I, R) and, for kernels with k_h * k_w > 1, ``core``
    (R, R, k_h, k_w). Calling the module builds the dense factor.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        kernel_size: tuple[int, int] = (1, 1),
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.rank = rank
        self.kernel_size = tuple(kernel_size)
        self.x = nn.Parameter(torch.empty(out_features, rank, **kw))  # (O, R)
        self.y = nn.Parameter(torch.empty(in_features, rank, **kw))  # (I, R)
        if kernel_area(self.kernel_size) > 1:
            self.core = nn.Parameter(torch.empty(rank, rank, *self.kernel_size, **kw))  # (R, R, kh, kw)
        else:
            self.register_parameter("core", None)
        self.reset_parameters(1.0)

    def forward(self) -> torch.Tensor:
        if self.core is None:
            return self.x @ self.y.T  # (O, R) @ (R, I) -> (O, I)
        # T x_2 Y: (R, R, kh, kw), (I, R) -> (R, I, kh, kw); then x_1 X -> (O, I, kh, kw)
        t_y = torch.einsum("abhw,ib->aihw", self.core, self.y)
        return torch.einsum("oa,aihw->oihw", self.x, t_y)

    def extra_repr(self) -> str:
        shape = (self.x.shape[0], self.y.shape[0], *self.kernel_size) if self.core is not None else (
            self.x.shape[0], self.y.shape[0])
        return f"shape={shape}, rank={self.rank}, form={'matrix' if self.core is None else 'tucker2'}"

    @torch.no_grad()
    def reset_parameters(self, variance: float) -> None:
        """Draw every stored tensor so that each entry of the built factor has this variance."""
        terms, n = (self.rank, 2) if self.core is None else (self.rank**2, 3)
        std = (variance / terms) ** (1.0 / (2 * n))
        for p in self.parameters():
            p.normal_(0.0, std)


class FactorisedLinear(nn.Module):
    """Plumbing of a Linear layer whose weight is built from factors: y = x W^T + b.

    Subclasses set up their factors and define ``build_weight() -> (out_features, in_features)``.
    ``weight`` is the built weight, so code that reads ``layer.weight`` keeps working.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, name: str | None = None
    ) -> None:
        super().__init__()
        where = name or type(self).__name__
        for label, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {label} must be a positive int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def fan_in(self) -> int:
        return self.in_features

    kernel_size = (1, 1)

    def _factor_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _as_kernel(self, w: torch.Tensor) -> torch.Tensor:
        return w  # (O, I): a Linear weight is already in shape

    def build_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.build_weight()

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (*, I) -> (*, O)
        return F.linear(input, self.build_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class FactorisedConv2d(nn.Module):
    """Plumbing of a Conv2d whose kernel is built from factors; same semantics as ``nn.Conv2d``.

    Stride, padding (ints, pairs, "same", "valid"), dilation, padding_mode and bias behave as in
    ``nn.Conv2d``; groups must be 1. Subclasses define ``build_weight() -> (O, I, k_h, k_w)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        where = name or type(self).__name__
        for label, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {label} must be a positive int, got {v!r}")
        if groups != 1:
            raise ValueError(f"{where}: groups must be 1 (factorised kernels are not grouped), got {groups!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{where}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(_pair(kernel_size))
        self.stride = tuple(_pair(stride))
        self.dilation = tuple(_pair(dilation))
        kernel_area(self.kernel_size)  # validates
        for label, v in (("stride", self.stride), ("dilation", self.dilation)):
            if len(v) != 2 or not all(isinstance(s, int) and s >= 1 for s in v):
                raise ValueError(f"{where}: {label} must be a positive int or pair, got {v!r}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{where}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{where}: padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = tuple(_pair(padding))
            if len(self.padding) != 2 or not all(isinstance(p, int) and p >= 0 for p in self.padding):
                raise ValueError(f"{where}: padding must be a non-negative int or pair, got {padding!r}")
        self.padding_mode = padding_mode
        self.groups = 1
        # F.pad order (left, right, top, bottom), as nn.Conv2d builds it
        if isinstance(self.padding, str):
            pads: list[int] = []
            if self.padding == "same":
                for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
            else:
                pads = [0, 0, 0, 0]
        else:
            pads = [self.padding[1], self.padding[1], self.padding[0], self.padding[0]]
        self._pad_lrtb = tuple(pads)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def fan_in(self) -> int:
        return self.in_channels * kernel_area(self.kernel_size)

    def _factor_shape(self) -> tuple[int, int]:
        return self.out_channels, self.in_channels

    def _as_kernel(self, w: torch.Tensor) -> torch.Tensor:
        """A matrix-form factor (O, I) of a 1x1 kernel viewed as (O, I, 1, 1)."""
        return w if w.dim() == 4 else w[:, :, None, None]

    def build_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.build_weight()

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (N, I, H, W) or (I, H, W)
        w = self.build_weight()  # (O, I, kh, kw)
        if self.padding_mode != "zeros":
            return F.conv2d(
                F.pad(input, self._pad_lrtb, mode=self.padding_mode), w, self.bias, self.stride, 0, self.dilation
            )
        return F.conv2d(input, w, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"

