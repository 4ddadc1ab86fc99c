"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared random init; only B is trained,
sent and averaged, which makes the aggregate of the products exact (sum_i p_i B_i A = B_avg A)."""

from __future__ import annotations

from fedlowrank.algorithms.fedavg import FedAvg

__all__ = ["FFALoRA"]


class FFALoRA(FedAvg):
    """FFA-LoRA (Sun et al. 2024): A frozen at its shared random init; only B is trained, sent and averaged."""

    name = "ffa-lora"

    def trainable_keys(self, state):
        return [k for k in state if "lora_A" not in k]
