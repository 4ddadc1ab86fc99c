"""Federated algorithms on one interface (`fedlowrank.algorithms.base.Algorithm`).

`make_algorithm(name, options)` builds one by registry name with its typed config, rejecting
unknown options by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedlowrank.algorithms.base import Algorithm, ClientInfo, RoundInfo, apply_broadcast, derive_seed
from fedlowrank.algorithms.fedavg import FedAvg, FedAvgImportance, FedAvgMagnitude, FedDARE, FedProx
from fedlowrank.algorithms.fedper import FedPer
from fedlowrank.algorithms.fedsa_lora import FedSALoRA
from fedlowrank.algorithms.fedsrd import FedSRD, FedSRDe, FedSRDePlus, FedSRDPlus, decompose
from fedlowrank.algorithms.ffa_lora import FFALoRA
from fedlowrank.algorithms.flexlora import FlexLoRA
from fedlowrank.config import ConfigError, did_you_mean, from_mapping

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (FedSRD, FedSRDe, FedSRDPlus, FedSRDePlus, FedAvg, FedProx, FFALoRA, FlexLoRA, FedDARE, FedAvgMagnitude, FedAvgImportance, FedPer, FedSALoRA)
}

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClientInfo",
    "RoundInfo",
    "algorithm_description",
    "apply_broadcast",
    "decompose",
    "derive_seed",
    "make_algorithm",
]


def algorithm_description(cls: type[Algorithm]) -> str:
    """The first paragraph of the algorithm class's docstring (what `fedlowrank list` shows)."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def make_algorithm(name: str, options: Mapping[str, Any] | None = None) -> Algorithm:
    """The algorithm registered as `name`, configured from `options` (validated by field)."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm: unknown {name!r}{did_you_mean(name, ALGORITHMS)}; available: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[name]
    base = cls(None).config  # the class's own defaults (e.g. FedSRD-e's efficient=True)
    merged = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    merged.update(options or {})
    config = from_mapping(cls.Config, merged, where=f"algorithm.{name}")
    return cls(config)
