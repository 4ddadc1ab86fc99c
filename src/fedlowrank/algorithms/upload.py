"""Client upload sparsification shared by FedSRD and the FedAvg family.

`UploadConfig` fields appear in every config that sparsifies uploads:

* `upload_mask`: "none" (dense deltas), "importance" (FedSRD Eq. 6 scores, top-k),
  "magnitude" (|delta|, top-k; FedSRD Table 7's plug-in) or "random" (DARE, Yu et al. 2024:
  Bernoulli drop with 1/(1-p) rescale; positions are a seed, so they cost no bytes).
* `upload_sparsity`: the fraction dropped; for top-k masks it is Eq. 7's base ratio alpha.
* `adaptive`, `coeff`, `cap`: Eq. 7's kurtosis offset (top-k masks only).
* `upload_rescale`: "l1" rescales kept entries to the dense delta's L1 mass (the published
  FedSRD code does; the paper does not), "none" by default.

Importance (Eq. 6) is defined for LoRA factors only; with `importance`, other trained keys (a
classifier head, say) are uploaded dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fedlowrank.algorithms.base import KIND_DELTA, ClientInfo, check_fields, derive_seed
from fedlowrank.config import ConfigError
from fedlowrank.lora import lora_pairs
from fedlowrank.payload import Payload
from fedlowrank.sparsify import adaptive_sparsity, dare, importance_scores, l1_rescale, topk_mask

__all__ = ["UploadConfig", "sparse_upload"]


@dataclass(frozen=True)
class UploadConfig:
    upload_mask: Literal["none", "importance", "magnitude", "random"] = "none"
    upload_sparsity: float = 0.85
    adaptive: bool = True
    coeff: float = 0.1
    cap: float = 0.11
    upload_rescale: Literal["none", "l1"] = "none"
    weighting: Literal["uniform", "samples"] = "uniform"

    def __post_init__(self) -> None:
        check_fields(self, coeff=(0.0, 10.0), cap=(0.0, 1.0))
        if not 0.0 <= self.upload_sparsity < 1.0:
            raise ConfigError(f"upload_sparsity: must lie in [0, 1), got {self.upload_sparsity}")


def _ratio(scores: torch.Tensor, cfg: UploadConfig) -> float:
    if cfg.adaptive:
        return min(1.0, adaptive_sparsity(scores, cfg.upload_sparsity, cfg.coeff, cfg.cap))
    return cfg.upload_sparsity


def _topk(delta: torch.Tensor, scores: torch.Tensor, cfg: UploadConfig) -> torch.Tensor:
    kept = torch.where(topk_mask(scores, _ratio(scores, cfg)), delta, torch.zeros_like(delta))
    return l1_rescale(delta, kept) if cfg.upload_rescale == "l1" else kept


def sparse_upload(
    start: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    keys: list[str],
    cfg: UploadConfig,
    info: ClientInfo,
) -> Payload:
    """The (sparsified) deltas trained - start of `keys`, as an upload payload."""
    deltas = {k: (trained[k] - start[k]).detach() for k in keys}
    seeds: dict[str, tuple[int, float]] = {}
    if cfg.upload_mask == "none":
        return Payload(deltas, meta={"kind": KIND_DELTA, "round": info.round})
    out: dict[str, torch.Tensor] = {}
    if cfg.upload_mask == "random":
        for k, d in deltas.items():
            seed = derive_seed(info.seed, "upload", info.round, info.client_id, k)
            out[k] = dare(d, cfg.upload_sparsity, seed)
            seeds[k] = (seed, 1.0 - cfg.upload_sparsity)
        return Payload(out, seeds=seeds, meta={"kind": KIND_DELTA, "round": info.round})
    scores: dict[str, torch.Tensor] = {}
    if cfg.upload_mask == "importance":
        sent = set(keys)
        for b_key, a_key in lora_pairs(start).values():
            if b_key in sent or a_key in sent:  # FFA-LoRA sends B alone: dA is zero
                dB = deltas.get(b_key, torch.zeros_like(start[b_key]))
                dA = deltas.get(a_key, torch.zeros_like(start[a_key]))
                IB, IA = importance_scores(dB, dA, trained[b_key], start[a_key])
                scores[b_key], scores[a_key] = IB, IA
    for k, d in deltas.items():
        if cfg.upload_mask == "magnitude":
            out[k] = _topk(d, d.abs(), cfg)
        elif k in scores:
            out[k] = _topk(d, scores[k], cfg)
        else:  # importance is defined for LoRA factors only: other keys (a head) go dense
            out[k] = d
    return Payload(out, meta={"kind": KIND_DELTA, "round": info.round})
