"""Client upload sparsification shared by FedSRD and the FedAvg family.

`UploadConfig` fields appear in every config that sparsifies uploads:

* `upload_mask`: "none" (dense deltas), "importance" (FedSRD Eq. 6 scores, top-k),
  "magnitude" (|delta|, top-k; FedSRD Table 7's plug-in), "random" (DARE, Yu et al. 2024:
  Bernoulli drop with 1/(1-p) rescale; positions are a seed, so they cost no bytes) or
  "importance-sampled" (our extension: entry j kept with probability p_j proportional to its
  Eq. 6 importance, clipped to 1, the same expected count as top-k, kept values scaled by
  1/p_j so the upload is unbiased; positions are sent like top-k's).
* `upload_sparsity`: the fraction dropped; for top-k and sampled masks it is Eq. 7's base ratio
  alpha.
* `adaptive`, `coeff`, `cap`: Eq. 7's kurtosis offset (top-k and sampled masks).
* `upload_rescale`: "l1" rescales kept entries to the dense delta's L1 mass (the published
  FedSRD code does; the paper does not), "none" by default.
* `upload_feedback`: client error feedback (our extension; Seide et al. 2014, Stich et al. 2018
  for top-k): each client adds what its mask did not send last time to its next delta, and keeps
  the new remainder as its memory (see `Algorithm.client_step`). Costs no bytes; one
  adapter-sized tensor set per client. The remainder is taken before encoding, so with bf16 or
  fp16 values the rounding is not fed back.

Importance (Eq. 6) is defined for LoRA factors only; with importance masks, other trained keys
(a classifier head, say) are uploaded dense. So they are with the random mask when the state has
LoRA factors: DARE at 90% drop turns a 10-entry output bias into one entry scaled 10x per client,
which made `fed-dare` predict a single class on digits (10.0% accuracy from round 15); the
papers' Fed-DARE sparsifies LoRA updates only. Without LoRA factors (full fine-tuning) every key
is masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fedlowrank.algorithms.base import KIND_DELTA, ClientInfo, State, check_fields, derive_seed
from fedlowrank.config import ConfigError, choice
from fedlowrank.lora import lora_pairs
from fedlowrank.payload import Payload
from fedlowrank.sparsify import (
    adaptive_sparsity,
    dare,
    importance_sample,
    importance_scores,
    keep_count,
    kept_energy,
    l1_rescale,
    topk_mask,
)

__all__ = ["UploadConfig", "SparseUploadClient", "sparse_upload", "UPLOAD_MASKS"]

UPLOAD_MASKS = ("none", "importance", "magnitude", "random", "importance-sampled")


@dataclass(frozen=True)
class UploadConfig:
    # which entries a client uploads: "none" (dense), "importance" (FedSRD Eq. 6, top-k), "magnitude" (top-k of |delta|), "random" (DARE, seeded) or "importance-sampled" (unbiased, ours)
    upload_mask: Literal["none", "importance", "magnitude", "random", "importance-sampled"] = "none"
    # fraction of entries dropped, in [0, 1): Eq. 7's base ratio alpha for top-k and sampled masks, the drop probability for "random"
    upload_sparsity: float = 0.85
    # Eq. 7's kurtosis offset: rho = alpha + min(cap, coeff ln(max(kurtosis, 1))); false: rho = alpha
    adaptive: bool = True
    # Eq. 7's coefficient of ln(kurtosis), in [0, 10]
    coeff: float = 0.1
    # Eq. 7's cap on the kurtosis offset, in [0, 1]
    cap: float = 0.11
    # "l1" rescales kept entries to the dense delta's L1 mass (the published FedSRD code; not the paper); "none"
    upload_rescale: Literal["none", "l1"] = "none"
    # "uniform": p_i = 1/m (FedSRD Eq. 9); "samples": by each client's training-sample count (the server's own count)
    weighting: Literal["uniform", "samples"] = "uniform"
    # client error feedback (ours): each client adds what its mask did not send last time to its next delta; no bytes, one adapter-sized memory per client
    upload_feedback: bool = False

    def __post_init__(self) -> None:
        check_fields(self, coeff=(0.0, 10.0), cap=(0.0, 1.0))
        if not 0.0 <= self.upload_sparsity < 1.0:
            raise ConfigError(f"upload_sparsity: must lie in [0, 1), got {self.upload_sparsity}")
        choice(self.upload_mask, "upload_mask", UPLOAD_MASKS)


def _ratio(scores: torch.Tensor, cfg: UploadConfig) -> float:
    if cfg.adaptive:
        return min(1.0, adaptive_sparsity(scores, cfg.upload_sparsity, cfg.coeff, cfg.cap))
    return cfg.upload_sparsity


def _topk(delta: torch.Tensor, scores: torch.Tensor, cfg: UploadConfig) -> torch.Tensor:
    kept = torch.where(topk_mask(scores, _ratio(scores, cfg)), delta, torch.zeros_like(delta))
    return l1_rescale(delta, kept) if cfg.upload_rescale == "l1" else kept


def _sampled(delta: torch.Tensor, scores: torch.Tensor, cfg: UploadConfig, seed: int) -> torch.Tensor:
    k = keep_count(delta.numel(), _ratio(scores, cfg))
    return importance_sample(delta, scores, k, seed)


def _masked(deltas: dict[str, torch.Tensor], start, trained, keys: list[str], cfg: UploadConfig, info: ClientInfo):
    """(sparse deltas, DARE seeds) for the configured mask."""
    out: dict[str, torch.Tensor] = {}
    seeds: dict[str, tuple[int, float]] = {}
    if cfg.upload_mask == "none":
        return dict(deltas), seeds
    if cfg.upload_mask == "random":
        factors = {k for pair in lora_pairs(start).values() for k in pair}
        for k, d in deltas.items():
            if factors and k not in factors:  # a head or bias next to LoRA factors travels dense
                out[k] = d
                continue
            seed = derive_seed(info.seed, "upload", info.round, info.client_id, k)
            out[k] = dare(d, cfg.upload_sparsity, seed)
            seeds[k] = (seed, 1.0 - cfg.upload_sparsity)
        return out, seeds
    scores: dict[str, torch.Tensor] = {}
    if cfg.upload_mask in ("importance", "importance-sampled"):
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
        elif k not in scores:  # importance is defined for LoRA factors only: other keys go dense
            out[k] = d
        elif cfg.upload_mask == "importance":
            out[k] = _topk(d, scores[k], cfg)
        else:
            out[k] = _sampled(d, scores[k], cfg, derive_seed(info.seed, "upload-sample", info.round, info.client_id, k))
    return out, seeds


def _kept_energy(deltas: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the deltas' squared norm at the positions the mask kept (before rescaling)."""
    parts = [kept_energy(d, sent[k]) for k, d in deltas.items()]
    total = sum(t for _, t in parts)
    return sum(k for k, _ in parts) / total if total > 0 else 1.0


def sparse_upload(
    start: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    keys: list[str],
    cfg: UploadConfig,
    info: ClientInfo,
    memory: State | None = None,
) -> tuple[Payload, State]:
    """The (sparsified) deltas trained - start of `keys`, as an upload payload, and the client's
    new memory: with `upload_feedback`, the remainder delta + old remainder - sent of each key
    (else empty). `payload.stats["upload_kept_energy"]` is the fraction of the (corrected)
    deltas' energy at the kept positions."""
    deltas = {k: (trained[k] - start[k]).detach() for k in keys}
    if cfg.upload_feedback and memory:
        for k in keys:
            if k in memory:
                deltas[k] = deltas[k] + memory[k].to(deltas[k].dtype)
    out, seeds = _masked(deltas, start, trained, keys, cfg, info)
    new_memory: State = {}
    if cfg.upload_feedback:
        new_memory = {k: (deltas[k] - out[k]).contiguous() for k in keys}
    payload = Payload(out, seeds=seeds, meta={"kind": KIND_DELTA, "round": info.round},
                      stats={"upload_kept_energy": _kept_energy(deltas, out)})  # fmt: skip
    return payload, new_memory


class SparseUploadClient:
    """The client side of every algorithm whose upload is `sparse_upload` under its config."""

    config: UploadConfig

    def client_payload(self, start, trained, info: ClientInfo) -> Payload:
        return self.client_step(start, trained, info, {})[0]

    def client_step(self, start, trained, info: ClientInfo, memory: State) -> tuple[Payload, State]:
        return sparse_upload(start, trained, self.sent_keys(start), self.config, info, memory)  # type: ignore[attr-defined]
