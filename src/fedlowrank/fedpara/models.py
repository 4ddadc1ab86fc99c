"""VGG16 with GroupNorm, plain, FedPara or low-rank, and the paper's model-size table.

The model of Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning", ICLR 2022, Sec. 4 (CIFAR-10/100, CINIC-10): VGG16
whose BatchNorms are GroupNorm with 2 groups (affine), 3x3 convolutions with biases, and a head
Dropout-512-ReLU-Dropout-512-ReLU-classes that stays dense. With ``gamma`` every convolution,
the first included, becomes a FedPara (or, with ``low_rank``, a same-budget low-rank) layer.

That reproduces the paper's sizes exactly: 15.25M parameters for 10 classes and 1.547M with
FedPara at gamma = 0.1; 15.30M for 100 classes and 4.532M at gamma = 0.4.

    python -m fedlowrank.fedpara        # prints the table (markdown)
"""

from __future__ import annotations

import torch
from torch import nn

from .convert import ConversionTable, fedparaize

__all__ = ["VGG16_CONFIG", "vgg16", "vgg16_with_table", "paper_size_table", "print_size_table", "PAPER_SIZES"]

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# (num_classes, gamma) -> the paper's parameter count as printed (None: the original model)
PAPER_SIZES = {(10, None): "15.25M", (10, 0.1): "1.547M", (100, None): "15.30M", (100, 0.4): "4.532M"}


class VGG16(nn.Module):
    """VGG16-GN: 13 conv3x3 + GroupNorm(2) + ReLU blocks, 5 max-pools, a 512-512-classes head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16_CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.GroupNorm(2, v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 1x1 already for 32x32 inputs; lets larger ones through
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, classes)
        x = self.pool(self.features(x))  # (N, 512, 1, 1)
        return self.classifier(torch.flatten(x, 1))


def vgg16_with_table(
    num_classes: int = 10, gamma: float | None = None, low_rank: bool = False, **kwargs
) -> tuple[nn.Module, ConversionTable | None]:
    """``vgg16`` plus the conversion table (None for the plain model)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"vgg16: num_classes must be a positive int, got {num_classes!r}")
    if low_rank and gamma is None:
        raise ValueError("vgg16: low_rank=True needs gamma= to set the parameter budget")
    nonlinear = kwargs.pop("nonlinear", False)
    model = VGG16(num_classes, **kwargs)
    if gamma is None:
        return model, None
    kind = "lowrank" if low_rank else "fedpara"
    return fedparaize(model, gamma, include=[nn.Conv2d], kind=kind, nonlinear=nonlinear, inplace=True)


def vgg16(num_classes: int = 10, gamma: float | None = None, low_rank: bool = False, **kwargs) -> nn.Module:
    """VGG16-GN; with ``gamma`` every conv is FedPara (or same-budget low-rank with ``low_rank``).

    kwargs: ``in_channels`` (3), ``dropout`` (0.5), ``nonlinear`` (tanh FedPara factors).
    """
    return vgg16_with_table(num_classes, gamma, low_rank, **kwargs)[0]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def paper_size_table() -> list[dict]:
    """Measured parameter counts of VGG16-GN next to the paper's figures."""
    rows = []
    for classes, gamma in [(10, None), (10, 0.1), (100, None), (100, 0.4)]:
        for low_rank in (False, True) if gamma is not None else (False,):
            n = _count(vgg16(classes, gamma, low_rank))
            rows.append({
                "model": "VGG16-GN" + ("" if gamma is None else (" low-rank" if low_rank else " FedPara")),
                "classes": classes, "gamma": gamma, "params": n,
                "paper": "" if low_rank else PAPER_SIZES[(classes, gamma)],
            })  # fmt: skip
    return rows


def print_size_table() -> None:
    """Print ``paper_size_table()`` as markdown (``python -m fedlowrank.fedpara``)."""
    print("| model | classes | gamma | params | params (M) | paper |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in paper_size_table():
        g = "-" if r["gamma"] is None else r["gamma"]
        n = r["params"]
        print(f"| {r['model']} | {r['classes']} | {g} | {n:,} | {n / 1e6:.3f} | {r['paper'] or '-'} |")
