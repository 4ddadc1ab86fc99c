"""FedAvg on LoRA factors and its sparsified / proximal variants.

* FedAvg (McMahan et al. 2017) applied to LoRA, A and B averaged separately (FedIT, Zhang et
  al. 2024): clients upload dense deltas, the server broadcasts their weighted mean.
* FedProx (Li et al. 2020): FedAvg plus mu/2 ||theta - theta_global||^2 in the local loss,
  mu = 0.01 as in the FedSRD code.
* Fed-DARE: DARE on the upload (drop p = 0.9, rescale 1/(1-p); Yu et al. 2024), then averaging.
  The mask is seeded, so its positions cost no bytes.
* FedAvg with magnitude or importance top-k uploads (FedSRD Table 7's plug-ins), the ratio from
  FedSRD Eq. 7 on each method's own scores.

Clients start every round from the global state, so averaging deltas equals averaging states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlowrank.algorithms.aggregation import Aggregator, WeightedMeans, aggregate
from fedlowrank.algorithms.base import (
    KIND_DELTA,
    Algorithm,
    RoundInfo,
    State,
    aggregation_weights,
    check_fields,
)
from fedlowrank.algorithms.upload import SparseUploadClient, UploadConfig
from fedlowrank.payload import Payload

__all__ = ["FedAvg", "FedAvgConfig", "FedProx", "FedDARE", "FedAvgMagnitude", "FedAvgImportance"]


@dataclass(frozen=True)
class FedAvgConfig(UploadConfig):
    # FedProx's proximal weight mu in [0, 1e6]: mu/2 ||theta - theta_global||^2 is added to the local loss; 0: none
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, prox_mu=(0.0, 1e6))


class FedAvg(SparseUploadClient, Algorithm):
    """FedAvg of the sent parameters' deltas (uploads optionally sparsified, see UploadConfig)."""

    name = "fedavg"
    Config = FedAvgConfig
    defaults: dict = {}

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        self.config = config or self.Config(**self.defaults)

    def server_broadcast(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Payload],
        num_samples: Sequence[int],
        info: RoundInfo,
    ) -> Payload:
        return aggregate(self.aggregator(global_state, num_samples, info, {}), uploads)[0]

    def aggregator(self, global_state, num_samples, info: RoundInfo, memory: State) -> Aggregator:
        """Streaming: each upload is added into the running weighted means and let go."""
        return _MeanAggregator(global_state, self.sent_keys(global_state),
                               aggregation_weights(num_samples, self.config.weighting), info.round)  # fmt: skip

    def regularizer(self, params, global_state):
        mu = self.config.prox_mu
        if mu == 0.0:
            return None
        terms = [((params[k] - global_state[k].to(params[k].device)) ** 2).sum() for k in params if k in global_state]
        return 0.5 * mu * torch.stack(terms).sum() if terms else None


class _MeanAggregator(Aggregator):
    keeps_uploads = False  # each upload is added into the sums and let go

    def __init__(self, global_state, keys, weights, round: int) -> None:
        self.means = WeightedMeans(global_state, keys, weights)
        self.round = round

    def add(self, upload: Payload) -> None:
        self.means.add(upload)

    def finish(self) -> tuple[Payload, State]:
        self.means.check_complete()
        return Payload(dict(self.means.sums), meta={"kind": KIND_DELTA, "round": self.round}), {}


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||theta - theta_global||^2, mu = 0.01."""

    name = "fedprox"
    defaults = {"prox_mu": 0.01}


class FedDARE(FedAvg):
    """Fed-DARE: FedAvg with DARE on the LoRA uploads (drop 90%, survivors scaled 10x; seeded mask)."""

    name = "fed-dare"
    defaults = {"upload_mask": "random", "upload_sparsity": 0.9}


class FedAvgMagnitude(FedAvg):
    """FedAvg with magnitude top-k uploads (FedSRD Table 7's plug-in, Eq. 7's ratio)."""

    name = "fedavg-magnitude"
    defaults = {"upload_mask": "magnitude"}


class FedAvgImportance(FedAvg):
    """FedAvg with FedSRD's importance top-k uploads (Eq. 6-8) and a dense mean on the server."""

    name = "fedavg-importance"
    defaults = {"upload_mask": "importance"}
