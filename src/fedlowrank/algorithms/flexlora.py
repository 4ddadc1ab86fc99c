"""FlexLoRA (Bai et al., NeurIPS 2024): average the full-rank products B_i A_i, truncate to
rank r by SVD and broadcast dense B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T.

The SVD is taken in factor space, never building the d_out x d_in average: exactly
(`fedlowrank.lora.truncated_svd_of_sum` over every client's factors) or, with `method =
"sketch"` (or "auto" beyond `sketch_above` = clients x rank), from a streaming sketch that
folds each upload in and lets it go (`fedlowrank.sketch`, shared with FedSRD). Non-LoRA keys
are averaged as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedlowrank.algorithms.aggregation import Aggregator, Collecting, ModuleSketches, aggregate, use_sketch
from fedlowrank.algorithms.base import KIND_STATE, RoundInfo, State, aggregation_weights, check_fields, mean_delta, reconstruct
from fedlowrank.algorithms.fedavg import FedAvg, FedAvgConfig
from fedlowrank.config import choice
from fedlowrank.lora import lora_pairs, truncated_svd_of_sum
from fedlowrank.payload import Payload

__all__ = ["FlexLoRA", "FlexLoRAConfig"]


@dataclass(frozen=True)
class FlexLoRAConfig(FedAvgConfig):
    # "factored": exact; "sketch": streaming (fedlowrank.sketch); "auto": exact while
    # clients x rank <= sketch_above or the exact step is cheap anyway (as FedSRD's)
    method: Literal["auto", "factored", "sketch"] = "auto"
    # where method = "auto" switches to "sketch": clients x LoRA rank above this
    sketch_above: int = 512
    # columns of a random sketch of what the cross approximation leaves out (0: none; >= clients x rank: exact)
    sketch_width: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        choice(self.method, "method", ("auto", "factored", "sketch"))
        check_fields(self, sketch_above=(0, 10**9), sketch_width=(0, 10**6))


class FlexLoRA(FedAvg):
    """FlexLoRA (Bai et al. 2024): average the products B_i A_i, truncate to rank r by SVD, broadcast dense."""

    name = "flexlora"
    Config = FlexLoRAConfig

    def server_broadcast(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Payload],
        num_samples: Sequence[int],
        info: RoundInfo,
    ) -> Payload:
        return aggregate(self.aggregator(global_state, num_samples, info, {}), uploads)[0]

    def aggregator(self, global_state, num_samples, info: RoundInfo, memory: State) -> Aggregator:
        cfg = self.config
        weights = aggregation_weights(num_samples, cfg.weighting)
        sent = self.sent_keys(global_state)
        if use_sketch(cfg.method, global_state, sent, len(num_samples), cfg.sketch_above):
            return _SketchStep(global_state, sent, weights, info, cfg.sketch_width)
        return Collecting(lambda uploads: (self._exact(global_state, uploads, weights, info), {}))

    def _exact(self, global_state, uploads, weights, info: RoundInfo) -> Payload:
        sent = self.sent_keys(global_state)
        out: dict[str, torch.Tensor] = {}
        for b_key, a_key in lora_pairs({k: global_state[k] for k in sent}).values():
            Bs, As = reconstruct(global_state, uploads, b_key), reconstruct(global_state, uploads, a_key)
            out[b_key], out[a_key] = truncated_svd_of_sum(Bs, As, weights, global_state[b_key].shape[1])
        for key in sent:
            if key not in out:
                out[key] = global_state[key] + mean_delta(global_state, uploads, weights, key)
        return Payload(out, meta={"kind": KIND_STATE, "round": info.round})


class _SketchStep(Aggregator):
    keeps_uploads = False  # each upload is folded into the sketches and let go

    def __init__(self, global_state, sent, weights, info: RoundInfo, width: int) -> None:
        self.global_state, self.round = global_state, info.round
        self.sums = ModuleSketches(global_state, sent, weights, info.seed, info.round,
                                   lambda t: torch.promote_types(t.dtype, torch.float32), width)  # fmt: skip

    def add(self, upload: Payload) -> None:
        self.sums.add(upload)

    def finish(self) -> tuple[Payload, State]:
        self.sums.check_complete()
        out: dict[str, torch.Tensor] = {}
        errors = []
        for module, sk in self.sums.sketches.items():
            b_key, a_key = self.sums.pairs[module]
            B, A = sk.truncated_svd(sk.B.shape[1])
            errors.append(sk.first_order_error(B, A))
            dt = self.global_state[b_key].dtype
            out[b_key], out[a_key] = B.to(dt), A.to(dt)
        for key, acc in self.sums.means.sums.items():
            out[key] = self.global_state[key] + acc
        stats = {"sketched": 1.0, "sketch_error_max": max(errors, default=0.0)}
        return Payload(out, meta={"kind": KIND_STATE, "round": self.round}, stats=stats), {}
