"""The numbers docs/fedpara.md quotes: VGG16-GN sizes and the std of freshly built weights.

    python -m fedlowrank.fedpara          # both tables, markdown

Init check: for each layer shape, the std of the built weight divided by He's sqrt(2 / fan_in).
1.0 is exactly He. The analytic draw alone (base.py) has He's variance in expectation (exactly
for the plain forms, approximately with tanh); the default init then rescales each draw to
exactly He's std.
"""

from __future__ import annotations

import math

import torch

from .layers import FedParaConv2d, FedParaLinear
from .lowrank import LowRankConv2d, LowRankLinear
from .models import print_size_table
from .pfedpara import PFedParaConv2d, PFedParaLinear

__all__ = ["INIT_SHAPES", "init_std_table", "main"]

# (in, out, kernel or None for Linear); VGG's first, middle and last convs, a 1x1, MLP layers
INIT_SHAPES = [(3, 64, 3), (64, 128, 3), (256, 256, 3), (512, 512, 3), (64, 32, 1), (784, 200, None),
               (256, 256, None), (64, 10, None)]  # fmt: skip

_VARIANTS = {
    "FedPara": (FedParaLinear, FedParaConv2d, {}),
    "FedPara tanh": (FedParaLinear, FedParaConv2d, {"nonlinear": True}),
    "low-rank": (LowRankLinear, LowRankConv2d, {}),
    "pFedPara": (PFedParaLinear, PFedParaConv2d, {}),
}


def init_std_table(gamma: float = 0.1, seeds: int = 10) -> list[dict]:
    """Rows {variant, shape, rank, draw_mean, draw_min, draw_max, exact}: std(W) / sqrt(2 / fan_in).

    ``draw_*``: the analytic draw alone (``reset_parameters(exact_std=False)``) over ``seeds``
    seeds; ``exact``: the largest deviation from 1 of the default init (draw + rescale).
    """
    rows = []
    for variant, (lin, conv, kw) in _VARIANTS.items():
        for i, o, k in INIT_SHAPES:
            draws, exact = [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                layer = lin(i, o, gamma=gamma, **kw) if k is None else conv(i, o, k, gamma=gamma, **kw)
                he = math.sqrt(2.0 / layer.fan_in)
                exact.append(layer.weight.detach().std().item() / he)
                layer.reset_parameters(exact_std=False)
                draws.append(layer.weight.detach().std().item() / he)
            shape = f"{o}x{i}" + (f"x{k}x{k}" if k is not None else "")
            rows.append({"variant": variant, "shape": shape, "rank": layer.rank, "draw_mean": sum(draws) / seeds,
                         "draw_min": min(draws), "draw_max": max(draws),
                         "exact": max(abs(r - 1.0) for r in exact) + 1.0})  # fmt: skip
    return rows


def main() -> None:
    print_size_table()
    print()
    print("std of the built weight / He's sqrt(2 / fan_in), gamma = 0.1, 10 seeds:")
    print()
    print("| layer | shape (out x in [x k x k]) | rank | draw only: mean | draw only: min - max "
          "| default init: worst |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for r in init_std_table():
        print(f"| {r['variant']} | {r['shape']} | {r['rank']} | {r['draw_mean']:.3f} | "
              f"{r['draw_min']:.3f} - {r['draw_max']:.3f} | {r['exact']:.4f} |")  # fmt: skip
