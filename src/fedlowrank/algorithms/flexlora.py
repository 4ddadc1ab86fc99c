"""FlexLoRA (Bai et al., NeurIPS 2024): average the full-rank products B_i A_i, truncate to
rank r by SVD and broadcast dense B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T.

The SVD is taken in factor space (`fedlowrank.lora.truncated_svd_of_sum`), never building the
d_out x d_in average. Non-LoRA keys are averaged as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlowrank.algorithms.base import KIND_STATE, RoundInfo, aggregation_weights, mean_delta, reconstruct
from fedlowrank.algorithms.fedavg import FedAvg
from fedlowrank.lora import lora_pairs, truncated_svd_of_sum
from fedlowrank.payload import Payload

__all__ = ["FlexLoRA"]


class FlexLoRA(FedAvg):
    name = "flexlora"

    def server_broadcast(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Payload],
        num_samples: Sequence[int],
        info: RoundInfo,
    ) -> Payload:
        weights = aggregation_weights(num_samples, self.config.weighting)
        sent = self.sent_keys(global_state)
        out: dict[str, torch.Tensor] = {}
        for b_key, a_key in lora_pairs({k: global_state[k] for k in sent}).values():
            Bs, As = reconstruct(global_state, uploads, b_key), reconstruct(global_state, uploads, a_key)
            out[b_key], out[a_key] = truncated_svd_of_sum(Bs, As, weights, global_state[b_key].shape[1])
        for key in sent:
            if key not in out:
                out[key] = global_state[key] + mean_delta(global_state, uploads, weights, key)
        return Payload(out, meta={"kind": KIND_STATE, "round": info.round})
