"""The in-process federated runtime (the default): the round protocol of
`fedlowrank.protocol.server` with every client a plain call on one model
(`fedlowrank.protocol.transport.InProcessTransport`), every byte through the codec.

Memory: the task holds the one model; per client the runtime keeps its last synced round and,
if the algorithm has local keys or client memory, those tensors (in `SimState`, so checkpoints
hold them). With `verify_sync` each client also keeps its own copy of the sent keys, built only
from the bytes it received, and the runtime checks it against the server's state before every
round (a self-test of the protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedlowrank.algorithms.base import Algorithm
from fedlowrank.protocol.messages import Encoded, client_diagnostics, encode
from fedlowrank.protocol.server import RoundServer, factor_norms, round_half_up
from fedlowrank.protocol.setup import keep_local
from fedlowrank.protocol.state import SimState
from fedlowrank.protocol.transport import Channel, InProcessTransport, Transport
from fedlowrank.roundconfig import POSITIONS, SimConfig  # re-exported: the runtime's config
from fedlowrank.tasks.base import Task

__all__ = ["SimConfig", "Simulation", "Channel", "SimState", "keep_local", "encode", "Encoded", "POSITIONS",
           "client_diagnostics", "factor_norms", "round_half_up"]  # fmt: skip


class Simulation(RoundServer):
    """One federated run of `algorithm` on `task`, clients in this process. `run()` returns the
    per-round records. `channel` carries upload bytes (tests corrupt them); `transport` builds
    another transport for the same round protocol (the Flower runtime passes its own)."""

    def __init__(
        self,
        task: Task,
        algorithm: Algorithm,
        config: SimConfig,
        seed: int = 0,
        channel: Channel | None = None,
        on_round: Callable[[dict[str, Any], SimState], None] | None = None,
        transport: Callable[[RoundServer], Transport] | None = None,
    ) -> None:
        super().__init__(task, algorithm, config, seed, transport or (lambda server: InProcessTransport(server, channel)),
                         on_round=on_round)  # fmt: skip
