"""FedPer: FedAvg over the base layers, personalization layers kept on each client.

Arivazhagan et al. 2019, "Federated Learning with Personalization Layers" (arXiv:1912.00818),
Algorithm 1: the model is split into base layers W_B and personalization layers W_P. In round t

  1. each sampled client j starts from the global base layers W_B^(t) and its own W_P,j;
  2. it trains both locally (the paper: E epochs of SGD on its own data);
  3. it uploads only its base layers; the server averages them (FedAvg) into W_B^(t+1);
  4. W_P,j never leaves the client and persists to its next round.

Here the base layers are whatever FedAvg sends and the personalization layers are the keys
that `local` selects; the runtime keeps them per client and, since local keys exist,
evaluates each client on its own test split with its own head. Uploads may be sparsified like
FedAvg's (UploadConfig).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlowrank.algorithms.fedavg import FedAvg, FedAvgConfig
from fedlowrank.config import ConfigError, require

__all__ = ["FedPer", "FedPerConfig", "match_local"]


@dataclass(frozen=True)
class FedPerConfig(FedAvgConfig):
    # Module prefixes of the personalization layers: a key is local when it equals a prefix or
    # starts with prefix + "." ("head" selects head.weight and head.bias, not heads.x). Every
    # prefix must match some key of the model (checked against the state at the first use).
    # Empty: the last layer, the module that holds the state's last key (the classifier head
    # of every task here: fashion's "23", shakespeare's "head", digits' "fc2").
    local: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for p in self.local:
            require(bool(p) and not p.startswith(".") and not p.endswith("."), "local", f"{p!r} is not a module prefix")


def match_local(keys: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The keys under any of `prefixes` (none: the last key's module), in state order;
    ConfigError naming a prefix that matches nothing (with the model's top-level modules)."""
    if not prefixes and keys:
        prefixes = (keys[-1].rpartition(".")[0] or keys[-1],)
    hits = {p: [k for k in keys if k == p or k.startswith(p + ".")] for p in prefixes}
    for p, got in hits.items():
        if not got:
            tops = sorted({k.split(".")[0] for k in keys}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
            raise ConfigError(f"local: {p!r} matches no key of the model; its top-level modules are {', '.join(tops)}")
    chosen = {k for got in hits.values() for k in got}
    return [k for k in keys if k in chosen]


class FedPer(FedAvg):
    """FedAvg of the base layers; the `local` layers (the classifier head) stay on each client."""

    name = "fedper"
    Config = FedPerConfig

    def local_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        local = match_local(list(state), self.config.local)
        if len(local) == len(state):
            raise ConfigError(f"local: {list(self.config.local)} selects every key; nothing would be federated")
        return local
