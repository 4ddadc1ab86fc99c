"""The algorithm interface shared by every runtime (docs/runtime.md).

An algorithm is pure tensor code, no I/O:

* `client_payload(start, trained, info)`: what a client uploads after training from `start`
  (the synced global state) to `trained`;
* `server_broadcast(global_state, uploads, num_samples, info)`: what the server sends back;
* `apply_broadcast(state, broadcast)`: how a broadcast changes a state. The same function runs on
  the server and on every client, on the same decoded bytes, so they stay bit-identical;
* client hooks: `trainable_keys` (FFA-LoRA freezes A), `local_keys` (never leave the client),
  `regularizer` (FedProx's proximal term), `init_state` (adjust the initial global state).

Algorithms that remember something between rounds declare it as explicit *memory*, a flat
`{name: tensor}` dict the runtime stores, checkpoints and restores: `client_step(start, trained,
info, memory)` and `server_step(global_state, uploads, num_samples, info, memory)` take the
memory and return the new one next to the payload. A client's memory lives with that client
(in-process: in the runtime's checkpoint; Flower: in the SuperNode's context, lost with the
node) and survives the rounds it is not sampled; the server's memory lives in the checkpoint.
The defaults call `client_payload` / `server_broadcast` and keep no memory, so a stateless
algorithm implements only those two.

The runtimes do not call `server_step` with a list: they ask `aggregator(global_state,
num_samples, info, memory)` for an `Aggregator` and feed it one decoded upload at a time
(`algorithms/aggregation.py`), so an algorithm whose step is a sum over clients (FedAvg, the
sketched FedSRD step) holds accumulators, not m uploads. The default collects the uploads and
calls `server_step`; `aggregate(alg.aggregator(...), uploads)` must equal `server_step` for every
algorithm (tests/test_streaming.py checks each registered one).

States are flat `{key: tensor}` dicts (an adapter's state dict, or a whole small model's).
Payloads carry `meta["kind"]`: "delta" (add to the state) or "state" (replace the values).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlowrank.algorithms.aggregation import Aggregator, Collecting
from fedlowrank.config import ConfigError
from fedlowrank.payload import Payload
from fedlowrank.seeds import derive_seed  # re-exported: algorithms seed by it

__all__ = [
    "Algorithm",
    "ClientInfo",
    "RoundInfo",
    "State",
    "aggregation_weights",
    "apply_broadcast",
    "derive_seed",
    "mean_delta",
    "reconstruct",
    "state_payload",
    "weighted_mean",
]

State = dict[str, torch.Tensor]

KIND_DELTA = "delta"
KIND_STATE = "state"


@dataclass(frozen=True)
class RoundInfo:
    """Server-side context of one round. Rounds are numbered 1, 2, ... as in the papers."""

    round: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.round < 1:
            raise ValueError(f"rounds are numbered from 1, got round={self.round}")


@dataclass(frozen=True)
class ClientInfo:
    """Client-side context: the round, the run seed and the client's id."""

    round: int
    client_id: int
    seed: int = 0


def aggregation_weights(num_samples: Sequence[int], weighting: str) -> list[float]:
    """Uniform 1/m (the FedSRD paper, Eq. 9) or proportional to each client's sample count."""
    m = len(num_samples)
    if m == 0:
        raise ValueError("cannot aggregate zero uploads")
    if weighting == "uniform":
        return [1.0 / m] * m
    if weighting == "samples":
        total = float(sum(num_samples))
        if total <= 0 or any(n < 0 for n in num_samples):
            raise ValueError(f"sample counts must be non-negative with a positive sum, got {list(num_samples)}")
        return [n / total for n in num_samples]
    raise ValueError(f"weighting must be 'uniform' or 'samples', got {weighting!r}")


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t, alpha=w)
    return out


def mean_delta(
    global_state: Mapping[str, torch.Tensor], uploads: Sequence[Payload], weights: Sequence[float], key: str
) -> torch.Tensor:
    """The weighted mean of the uploaded deltas of `key`, in the state's dtype."""
    return weighted_mean([u.tensors[key].to(global_state[key].dtype) for u in uploads], weights)


def reconstruct(global_state: Mapping[str, torch.Tensor], uploads: Sequence[Payload], key: str) -> list[torch.Tensor]:
    """Each client's tensor: the global one plus its uploaded delta (FedSRD Eq. 9's B_i, A_i)."""
    base = global_state[key]
    return [base + u.tensors[key].to(base.dtype) for u in uploads]


def apply_broadcast(state: Mapping[str, torch.Tensor], broadcast: Payload) -> State:
    """Return a new state: `state` with the broadcast's tensors added ("delta") or set ("state")."""
    kind = broadcast.meta.get("kind", KIND_DELTA)
    out = dict(state)
    for key, t in broadcast.tensors.items():
        if key not in out:
            raise KeyError(f"broadcast names {key!r}, which is not in the state")
        if out[key].shape != t.shape:
            raise ValueError(f"broadcast {key!r} has shape {tuple(t.shape)}, state has {tuple(out[key].shape)}")
        cur = out[key]
        if kind == KIND_DELTA:
            out[key] = cur + t.to(dtype=cur.dtype, device=cur.device)
        elif kind == KIND_STATE:
            out[key] = t.to(dtype=cur.dtype, device=cur.device).clone()
        else:
            raise ValueError(f"unknown broadcast kind {kind!r}")
    return out


def state_payload(state: Mapping[str, torch.Tensor], keys: Sequence[str], round: int) -> Payload:
    """The full values of `keys`, for a client that missed rounds (docs/runtime.md, "Catch up")."""
    return Payload({k: state[k].detach().clone() for k in keys}, meta={"kind": KIND_STATE, "round": round})


class Algorithm(ABC):
    """Base class: subclasses set `name`, implement the two abstract methods, override hooks."""

    name: ClassVar[str]

    # --- client hooks ---------------------------------------------------------------------
    def init_state(self, state: State, seed: int) -> State:
        """Adjust the initial global state (default: unchanged)."""
        return state

    def trainable_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys the client trains (default: all)."""
        return list(state)

    def local_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys that never leave the client (default: none)."""
        return []

    def sent_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys that travel between server and clients: trainable and not local."""
        local = set(self.local_keys(state))
        return [k for k in self.trainable_keys(state) if k not in local]

    def regularizer(
        self, params: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """An extra term for the local loss (default: none)."""
        return None

    # --- the two sides ----------------------------------------------------------------------
    @abstractmethod
    def client_payload(self, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], info: ClientInfo) -> Payload:
        ...

    @abstractmethod
    def server_broadcast(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Payload],
        num_samples: Sequence[int],
        info: RoundInfo,
    ) -> Payload:
        ...

    def apply_broadcast(self, state: Mapping[str, torch.Tensor], broadcast: Payload) -> State:
        return apply_broadcast(state, broadcast)

    # --- the two sides with memory (what the runtimes call) ---------------------------------
    def client_step(
        self, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], info: ClientInfo, memory: State
    ) -> tuple[Payload, State]:
        """The upload and the client's new memory (default: `client_payload`, no memory)."""
        return self.client_payload(start, trained, info), memory

    def server_step(
        self,
        global_state: Mapping[str, torch.Tensor],
        uploads: Sequence[Payload],
        num_samples: Sequence[int],
        info: RoundInfo,
        memory: State,
    ) -> tuple[Payload, State]:
        """The broadcast and the server's new memory (default: `server_broadcast`, no memory)."""
        return self.server_broadcast(global_state, uploads, num_samples, info), memory

    def aggregator(
        self,
        global_state: Mapping[str, torch.Tensor],
        num_samples: Sequence[int],
        info: RoundInfo,
        memory: State,
    ) -> Aggregator:
        """How the runtime feeds this round's uploads in (default: collect them, then `server_step`)."""
        return Collecting(lambda uploads: self.server_step(global_state, uploads, num_samples, info, memory))

    def upload_shapes(self, state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """What a valid upload contains: name -> shape (the server's decoder checks against it)."""
        return {k: tuple(state[k].shape) for k in self.sent_keys(state)}


def check_fields(cfg: object, **ranges: tuple[float, float]) -> None:
    """Raise ConfigError naming the field when a numeric field lies outside [lo, hi]."""
    for field, (lo, hi) in ranges.items():
        v = getattr(cfg, field)
        if not lo <= v <= hi:
            raise ConfigError(f"{field}: must lie in [{lo}, {hi}], got {v}")
