"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025): the A matrices learn general knowledge and are shared (uploaded and
averaged, FedAvg-style); the B matrices learn client-specific knowledge and stay on each client
(never uploaded). Client i's model is W0 + B_i A (Sec. 4, Alg. 1).

Here the B keys are the algorithm's local keys, so the runtime keeps one B per client (in the
checkpoint in-process; on the SuperNode on Flower), evaluates each client's own model on its own
test split (`sim.evaluation = "auto"`), and writes one adapter per client. Non-LoRA trained keys
(a classifier head) are shared and averaged like A: the paper fine-tunes LoRA only, and a head
kept local would make the method FedPer as well. Uploads may be sparsified like FedAvg's
(`UploadConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlowrank.algorithms.fedavg import FedAvg
from fedlowrank.config import ConfigError

__all__ = ["FedSALoRA"]


class FedSALoRA(FedAvg):
    """FedSA-LoRA: A shared and averaged, B kept on each client (Guo et al., ICLR 2025)."""

    name = "fedsa-lora"

    def local_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        local = [k for k in state if "lora_B" in k]
        if not local:
            raise ConfigError("fedsa-lora: the task's state has no LoRA B matrices (lora_B keys) to keep local")
        return local
