"""pFedPara: personalised FedPara layers and the global/local split of a model's state.

Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022, Sec. 3.3 (pFedPara; equation numbers not checked against the
PDF):

    W = W1 * (W2 + 1) = W1 * W2 + W1,

with W1, W2 FedPara factors (X Y^T, or Tucker-2 T x_1 X x_2 Y for kernels). W1's factors are
*global*: uploaded, averaged by the server and broadcast. W2's factors are *local*: they never
leave the client and persist across rounds. With W2 = 0 the layer is the shared W1 alone.

Biases are global unless the layer is built with ``local_bias=True`` (the paper does not say;
Flower's reproduction ends up keeping them local in effect). ``pfedpara_global_keys`` and
``pfedpara_local_keys`` list the names in ``model.state_dict()`` on each side; every key of the
model is on exactly one side (parameters of ordinary layers and buffers are global).

Initialisation: W1 and W2 get the same variance v with v (1 + v) = 2 / fan_in, so the built
weight has He variance (Var(W1 * (W2 + 1)) = Var(W1) (Var(W2) + 1) for independent zero-mean
factors); base.py gives the per-tensor rule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import FactorisedConv2d, FactorisedLinear, he_variance, rescale_to_std, tanh_preimage_variance
from .layers import HadamardFactors

__all__ = [
    "PFedParaLinear",
    "PFedParaConv2d",
    "PersonalisedHadamardFactors",
    "pfedpara_local_keys",
    "pfedpara_global_keys",
    "split_pfedpara_state",
]


class PersonalisedHadamardFactors(HadamardFactors):
    """pFedPara recipe: W = f(W1) * (f(W2) + 1), f = tanh with ``nonlinear``, else identity."""

    def _setup_personal(self, rank, gamma, nonlinear, local_bias, device, dtype, where) -> None:
        self.local_bias = bool(local_bias)
        self._setup_factors(rank, gamma, nonlinear, device, dtype, where)

    def reset_parameters(self, variance: float | None = None, exact_std: bool = True) -> None:
        """Draw the factors so the built weight has ``variance`` (default He, 2 / fan_in); zero bias.

        ``exact_std``: then scale them so this draw's std is exactly sqrt(variance) (base.py).
        """
        target = he_variance(self.fan_in) if variance is None else variance
        v = (math.sqrt(1.0 + 4.0 * target) - 1.0) / 2.0  # v (1 + v) = target
        if self.nonlinear:
            v = tanh_preimage_variance(v)
        self.w1.reset_parameters(v)
        self.w2.reset_parameters(v)
        tensors = list(self.w1.parameters())  # W is homogeneous of degree n in W1's n tensors
        if exact_std:
            rescale_to_std(self.build_weight, tensors, len(tensors), math.sqrt(target))
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def build_weight(self) -> torch.Tensor:  # (O, I) or (O, I, kh, kw)
        w1, w2 = self.w1(), self.w2()
        if self.nonlinear:
            w1, w2 = torch.tanh(w1), torch.tanh(w2)
        return self._as_kernel(w1 * (w2 + 1.0))

    def local_parameter_names(self) -> list[str]:
        """Names (relative to this layer) that stay on the client: W2's factors (+ bias if local)."""
        names = [f"w2.{n}" for n, _ in self.w2.named_parameters()]
        if self.local_bias and self.bias is not None:
            names.append("bias")
        return names

    def extra_repr(self) -> str:
        return super().extra_repr() + (", local_bias=True" if self.local_bias else "")


class PFedParaLinear(PersonalisedHadamardFactors, FactorisedLinear):
    """Drop-in for ``nn.Linear`` with W = (X1 Y1^T) * (X2 Y2^T + 1) (pFedPara).

    Args as ``FedParaLinear`` plus ``local_bias`` (keep the bias on the client).
    Global: ``w1.x``, ``w1.y`` (and ``bias``). Local: ``w2.x``, ``w2.y`` (and ``bias`` if local_bias).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        nonlinear: bool = False,
        local_bias: bool = False,
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        where = name or f"PFedParaLinear(in_features={in_features}, out_features={out_features})"
        super().__init__(in_features, out_features, bias, device, dtype, name=where)
        self._setup_personal(rank, gamma, nonlinear, local_bias, device, dtype, where)


class PFedParaConv2d(PersonalisedHadamardFactors, FactorisedConv2d):
    """Drop-in for ``nn.Conv2d`` (groups=1) with W = W1 * (W2 + 1), W_j Tucker-2 (pFedPara).

    Args as ``FedParaConv2d`` plus ``local_bias``. Global: ``w1.*`` (and ``bias``);
    local: ``w2.*`` (and ``bias`` if local_bias).
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
        local_bias: bool = False,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        where = name or f"PFedParaConv2d({in_channels}, {out_channels}, kernel_size={kernel_size})"
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype, name=where,
        )  # fmt: skip
        self._setup_personal(rank, gamma, nonlinear, local_bias, device, dtype, where)


def pfedpara_local_keys(model: nn.Module) -> list[str]:
    """Keys of ``model.state_dict()`` that never leave the client, in state-dict order."""
    local: set[str] = set()
    for mname, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PersonalisedHadamardFactors):
            prefix = f"{mname}." if mname else ""
            local.update(prefix + n for n in module.local_parameter_names())
    return [k for k in model.state_dict() if k in local]


def pfedpara_global_keys(model: nn.Module) -> list[str]:
    """Keys of ``model.state_dict()`` that are sent and averaged: every key not local."""
    local = set(pfedpara_local_keys(model))
    return [k for k in model.state_dict() if k not in local]


def split_pfedpara_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global part, local part) of ``state_dict`` (default: the model's own), split by key."""
    sd = model.state_dict() if state_dict is None else state_dict
    local = set(pfedpara_local_keys(model))
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"split_pfedpara_state: state_dict does not fit the model: lacks keys {missing[:5]}, "
            f"has unknown keys {unexpected[:5]}"
        )
    return {k: v for k, v in sd.items() if k not in local}, {k: v for k, v in sd.items() if k in local}
