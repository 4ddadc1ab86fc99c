"""What the round protocol keeps: the server's checkpointed `SimState`, and each client's
private `ClientHeld` (kept by the transport: in `SimState` in-process, on the SuperNode on Flower)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["State", "SimState", "ClientHeld"]

State = dict[str, torch.Tensor]


@dataclass
class SimState:
    """Everything a checkpoint holds: enough to continue after `round` exactly."""

    round: int
    global_state: State
    versions: np.ndarray  # (num_clients,) last round whose state each client holds (-1: unknown)
    local: dict[int, State] = field(default_factory=dict)  # the algorithm's local keys (in-process clients)
    client_copies: dict[int, State] = field(default_factory=dict)  # verify_sync only
    history: list[tuple[int, bytes, float]] = field(default_factory=list)  # (round, bytes, bound)
    pruned: int = 0  # broadcasts up to this round were dropped: older clients get the full state
    totals: dict[str, float] = field(default_factory=dict)
    server_memory: State = field(default_factory=dict)  # Algorithm.server_step's memory
    client_memory: dict[int, State] = field(default_factory=dict)  # Algorithm.client_step's (in-process clients)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "global_state": self.global_state,
            "versions": torch.from_numpy(self.versions.copy()),
            "local": self.local,
            "client_copies": self.client_copies,
            "history": [(r, torch.frombuffer(bytearray(b), dtype=torch.uint8), q) for r, b, q in self.history],
            "pruned": self.pruned,
            "totals": self.totals,
            "server_memory": self.server_memory,
            "client_memory": self.client_memory,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SimState":
        return cls(
            round=int(d["round"]),
            global_state=dict(d["global_state"]),
            versions=d["versions"].numpy().astype(np.int64),
            local={int(k): dict(v) for k, v in d["local"].items()},
            client_copies={int(k): dict(v) for k, v in d["client_copies"].items()},
            history=[(int(r), t.numpy().tobytes(), float(q)) for r, t, q in d["history"]],
            pruned=int(d["pruned"]),
            totals={k: float(v) for k, v in d["totals"].items()},
            server_memory=dict(d.get("server_memory", {})),
            client_memory={int(k): dict(v) for k, v in d.get("client_memory", {}).items()},
        )


@dataclass
class ClientHeld:
    """One client's private state between rounds; nothing of it is sent.

    `version` is the last round whose broadcast it applied. `sent` holds the sent keys as of
    that round, built only from the bytes it received; None where the transport lets a shared
    reference stand in (in-process without `verify_sync`: every synced client's copy would equal
    the server's state). `local` holds the keys that never leave it, `memory` the algorithm's
    client memory (`Algorithm.client_step`, e.g. upload error feedback's remainder)."""

    version: int = 0
    sent: State | None = None
    local: State = field(default_factory=dict)
    memory: State = field(default_factory=dict)
