"""`digits`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), for tests.

A two-layer MLP 64 -> hidden -> 10. Three modes:

* `lora`: frozen random base weights with a LoRA adapter on both layers in our naming,
  `fc1.lora_A` (r x 64), `fc1.lora_B` (hidden x r), ...; B starts at zero, A random. The state
  is the adapter plus the output bias (a non-LoRA key, averaged FedAvg-style), so every LoRA
  algorithm runs on it.
* `full`: every weight trains (FedAvg-style algorithms over the whole model).
* `pfedpara`: both layers are pFedPara layers (W1 global, W2 local to each client).

A quarter of each class is held out as the global test set; each client also gets its own test
split with its training label mix (for personalised evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
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

__all__ = ["DigitsTask", "DigitsConfig", "LoRALinear"]


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) x A^T B^T with W, b frozen; A (r x d_in) random, B (d_out x r) zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d_in) -> (N, d_out)
        return F.linear(x, self.weight, self.bias) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


@dataclass(frozen=True)
class DigitsConfig(PartitionConfig, TrainConfig):
    # "lora": frozen MLP + LoRA; "full": every weight trained; "pfedpara": FedPara layers with W2 kept local
    mode: Literal["lora", "full", "pfedpara"] = "lora"
    # the MLP's hidden width, in [1, 4096]
    hidden: int = 32
    # LoRA rank r of the MLP's layers
    lora_rank: int = 4
    # LoRA scaling alpha (the update is scaled by alpha / r)
    lora_alpha: float = 8.0
    # share of the 1797 images held out as the global test set
    test_fraction: float = 0.25
    local_steps: int = 5
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Literal["sgd", "adamw"] = "adamw"

    def __post_init__(self) -> None:
        PartitionConfig.__post_init__(self)
        TrainConfig.__post_init__(self)
        choice(self.mode, "mode", ("lora", "full", "pfedpara"))
        require(1 <= self.hidden <= 4096, "hidden", f"must lie in [1, 4096], got {self.hidden}")
        require(1 <= self.lora_rank <= 10, "lora_rank", f"must lie in [1, 10], got {self.lora_rank}")
        require(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(0.0 < self.test_fraction < 1.0, "test_fraction", f"must lie in (0, 1), got {self.test_fraction}")


class DigitsTask(PartitionedTask):
    name = "digits"
    Config = DigitsConfig
    num_classes = 10
    default_threads = 1  # ops this small only lose to thread hand-offs

    def _build(self) -> None:
        from sklearn.datasets import load_digits

        cfg: DigitsConfig = self.config
        X, y = load_digits(return_X_y=True)  # ships with scikit-learn, no download
        X = torch.tensor(X / 16.0, dtype=torch.float32)
        y = np.asarray(y, dtype=np.int64)
        rng = np.random.default_rng(derive_seed(self.seed, "digits-split"))
        test = stratified_sample(y, round(cfg.test_fraction * len(y)), rng)
        is_test = np.zeros(len(y), dtype=bool)
        is_test[test] = True
        self.X_train, self.y_train = X[~is_test], torch.from_numpy(y[~is_test])
        self.X_test, self.y_test = X[is_test], torch.from_numpy(y[is_test])
        self.parts, shares = partition_labels(y[~is_test], 10, cfg, self.seed)
        self.test_parts = split_like(y[is_test], shares, np.random.default_rng(derive_seed(self.seed, "digits-test")))

        if cfg.mode == "lora":
            fc1 = LoRALinear(64, cfg.hidden, cfg.lora_rank, cfg.lora_alpha)
            fc2 = LoRALinear(cfg.hidden, 10, cfg.lora_rank, cfg.lora_alpha)
            fc2.bias.requires_grad_(True)
        elif cfg.mode == "full":
            fc1, fc2 = nn.Linear(64, cfg.hidden), nn.Linear(cfg.hidden, 10)
        else:
            from fedlowrank.fedpara import PFedParaLinear

            fc1 = PFedParaLinear(64, cfg.hidden, gamma=0.5)
            fc2 = PFedParaLinear(cfg.hidden, 10, gamma=0.5)
        self.model = nn.Sequential()
        self.model.add_module("fc1", fc1)
        self.model.add_module("act", nn.ReLU())
        self.model.add_module("fc2", fc2)

    def local_keys(self) -> list[str]:
        if self.config.mode != "pfedpara":
            return []
        from fedlowrank.fedpara import pfedpara_local_keys

        return pfedpara_local_keys(self.model)

    def parameters(self) -> dict[str, nn.Parameter]:
        if self.config.mode == "lora":
            keys = ("fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B", "fc2.bias")
            named = dict(self.model.named_parameters())
            return {k: named[k] for k in keys}
        return dict(self.model.named_parameters())

    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        for sel in self.client_indices(client, generator):
            yield self.X_train[sel], self.y_train[sel]

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits

    def has_client_tests(self) -> bool:
        return True

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        if client is None:
            X, y = self.X_test, self.y_test
        else:
            sel = torch.from_numpy(self.test_parts[client])
            X, y = self.X_test[sel], self.y_test[sel]
        bs = self.config.eval_batch_size
        for s in range(0, len(y), bs):
            yield X[s : s + bs], y[s : s + bs]
