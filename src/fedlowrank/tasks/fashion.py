"""`fashion`: Fashion-MNIST (60k + 10k, 28x28, 10 classes) with a small VGG-style CNN, from scratch.

Data: Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist, IDX files; `make
install` installs it; $FEDLOWRANK_FASHION_MNIST points elsewhere). Training images are dealt to
clients by Dirichlet(alpha) over labels (or label groups); `test_samples` of the 10k test images
form the global test set, and each client gets a test split with its own label mix (for
pFedPara's personalised evaluation).

Model: per stage `w` in `widths`, two conv3x3 + GroupNorm(2) + ReLU blocks and a 2x2 max-pool
(VGG-style, as FedPara's VGG16-GN), then global average pooling and a linear head. `model`:

* `plain`: ordinary convolutions; every parameter is federated (FedAvg-style algorithms);
* `fedpara`: every convolution a FedPara layer, W = (T1 x1 X1 x2 Y1) * (T2 x1 X2 x2 Y2),
  inner rank from `gamma` (Hyeon-Woo et al., ICLR 2022);
* `lowrank`: the conventional low-rank layer with the same parameter budget;
* `pfedpara`: W = W1 * (W2 + 1); W2's factors are local to each client (never sent, kept across
  rounds) and evaluation is per client on its own test split.

Only the convolutions are factorised unless `fedpara_head = true`, which converts the linear
head as well (for `pfedpara` its W2 then personalises the classifier, as the paper's pFedPara
factorises fully connected layers).

Bytes come from the same codec as every other task: a FedPara model simply has fewer
parameters to send.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.seeds import derive_seed
from fedlowrank.config import choice, require
from fedlowrank.tasks.base import (
    Batch,
    PartitionConfig,
    PartitionedTask,
    TrainConfig,
    partition_labels,
    split_like,
    stratified_sample,
)

__all__ = ["FashionTask", "FashionConfig", "load_fashion_mnist", "small_vgg", "DATA_DIR"]

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # of the training images


@dataclass(frozen=True)
class FashionConfig(PartitionConfig, TrainConfig):
    # "plain" VGG-GN, "fedpara" (Hadamard low-rank convs), "lowrank" (same budget, plain low-rank) or "pfedpara" (W2 local)
    model: Literal["plain", "fedpara", "lowrank", "pfedpara"] = "plain"
    gamma: float = 0.1  # FedPara rank rule: 0 = R_min, 1 = R_max (the original layer's budget)
    # channels of the three conv stages
    widths: tuple[int, ...] = (16, 32, 64)
    fedpara_head: bool = False  # also factorise the linear head (pfedpara: its W2 stays local too)
    train_samples: int = 0  # 0 = all 60000; else a stratified subsample
    # test images (a stratified subsample of the 10000)
    test_samples: int = 2000
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        PartitionConfig.__post_init__(self)
        TrainConfig.__post_init__(self)
        choice(self.model, "model", ("plain", "fedpara", "lowrank", "pfedpara"))
        require(0.0 <= self.gamma <= 1.0, "gamma", f"must lie in [0, 1], got {self.gamma}")
        require(
            1 <= len(self.widths) <= 3 and all(2 <= w <= 1024 and w % 2 == 0 for w in self.widths),
            "widths",
            f"must be 1 to 3 even channel counts in [2, 1024], got {list(self.widths)}",
        )
        require(self.train_samples == 0 or self.train_samples >= 100, "train_samples", f"must be 0 (all) or >= 100, got {self.train_samples}")
        require(100 <= self.test_samples <= 10000, "test_samples", f"must lie in [100, 10000], got {self.test_samples}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if raw[:3] != b"\x00\x00\x08" or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise ValueError(f"{path}: not a uint8 IDX file")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (60000, 28, 28) uint8, train labels, test images, test labels)."""
    root = Path(os.environ.get("FEDLOWRANK_FASHION_MNIST", DATA_DIR))
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {missing[0]}): install Debian's dataset-fashion-mnist "
            "(`make install` does; or apt-get install dataset-fashion-mnist), or point $FEDLOWRANK_FASHION_MNIST at the IDX files"
        )
    return tuple(_read_idx(root / n) for n in names)  # type: ignore[return-value]


def small_vgg(widths: tuple[int, ...], num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """VGG-style: per width two conv3x3-GroupNorm(2)-ReLU blocks and a max-pool; GAP; linear head."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        for _ in range(2):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(2, w), nn.ReLU()]
            c = w
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


class FashionTask(PartitionedTask):
    name = "fashion"
    Config = FashionConfig
    num_classes = 10

    def _build(self) -> None:
        from fedlowrank.fedpara import fedparaize, pfedpara_local_keys

        cfg: FashionConfig = self.config
        xtr, ytr, xte, yte = load_fashion_mnist()
        rng = np.random.default_rng(derive_seed(self.seed, "fashion-split"))
        train = stratified_sample(ytr, cfg.train_samples, rng) if cfg.train_samples else np.arange(len(ytr))
        test = stratified_sample(yte, cfg.test_samples, rng)
        self.X_train, self.y_train = torch.from_numpy(xtr[train].copy()), torch.from_numpy(ytr[train].astype(np.int64))
        self.X_test, self.y_test = torch.from_numpy(xte[test].copy()), torch.from_numpy(yte[test].astype(np.int64))
        self.parts, shares = partition_labels(self.y_train.numpy(), 10, cfg, self.seed)
        self.test_parts = split_like(self.y_test.numpy(), shares, np.random.default_rng(derive_seed(self.seed, "fashion-test")))

        model = small_vgg(tuple(cfg.widths))
        self.table = None
        if cfg.model != "plain":
            layers = [nn.Conv2d, nn.Linear] if cfg.fedpara_head else [nn.Conv2d]
            model, self.table = fedparaize(model, gamma=cfg.gamma, include=layers, kind=cfg.model, inplace=True)
        self.model = model
        self._local = pfedpara_local_keys(model) if cfg.model == "pfedpara" else []

    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def local_keys(self) -> list[str]:
        return list(self._local)

    @staticmethod
    def _images(x: torch.Tensor) -> torch.Tensor:  # (B, 28, 28) uint8 -> (B, 1, 28, 28) normalised
        return ((x.float() / 255.0 - MEAN) / STD).unsqueeze(1)

    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        for sel in self.client_indices(client, generator):
            yield self._images(self.X_train[sel]), self.y_train[sel]

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits

    def has_client_tests(self) -> bool:
        return True

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        sel = torch.arange(len(self.y_test)) if client is None else torch.from_numpy(self.test_parts[client])
        bs = self.config.eval_batch_size
        for s in range(0, sel.numel(), bs):
            idx = sel[s : s + bs]
            yield self._images(self.X_test[idx]), self.y_test[idx]
