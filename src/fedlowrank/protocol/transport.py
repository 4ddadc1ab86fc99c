"""The seam between the two sides of a round: a `Transport` carries orders to clients and
their results back. `InProcessTransport` makes plain calls on one `ClientWorker`; the Flower
transport (`fedlowrank.flower.transport`) sends Flower messages to SuperNodes.

A transport also keeps each client's `ClientHeld`: in-process in the server's `SimState` (so a
checkpoint holds it and resume restores it), on Flower in each SuperNode (lost with the node).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from fedlowrank.protocol.client import ClientWorker
from fedlowrank.protocol.messages import EvalResult, TrainOrder, TrainResult
from fedlowrank.protocol.state import ClientHeld

if TYPE_CHECKING:
    from fedlowrank.protocol.server import RoundServer

__all__ = ["Transport", "InProcessTransport", "Channel"]


class Transport(Protocol):
    name: str

    def connect(self, round: int, clients: list[int]) -> tuple[dict[int, str], dict[int, int]]:
        """Before round `round`: ({sampled client: why it cannot be reached}, {client: the round
        it says it holds}, for any client that (re)joined since the last call)."""
        ...

    def train(self, round: int, orders: list[TrainOrder]) -> dict[int, TrainResult]:
        """Send each order; the results that came back (a missing client counts as lost)."""
        ...

    def broadcast(self, round: int, data: bytes, clients: list[int]) -> dict[int, str]:
        """Send the round's broadcast bytes to `clients`; {client: why it did not apply them}."""
        ...

    def evaluate(self, round: int, clients: list[int], order: Callable[[int], TrainOrder]) -> dict[int, EvalResult]:
        """Per-client evaluation after round `round`; `order(i)` brings client i up to date."""
        ...


class Channel:
    """Carries a client's upload bytes to the server. The default delivers them untouched;
    a test substitutes one that corrupts or truncates them."""

    def upload(self, round: int, client: int, data: bytes) -> bytes:
        return data


class InProcessTransport:
    """Clients are plain calls on the server's own task. Without `verify_sync` a synced client's
    sent keys are the server's global state itself (no copies); with it each client keeps its own
    copy, built only from the bytes it was sent, and it is checked against the server's state
    before every round it trains."""

    name = "in-process"

    def __init__(self, server: "RoundServer", channel: Channel | None = None) -> None:
        self.server = server
        self.worker = ClientWorker(server.task, server.setup, server.cfg, server.seed)
        self.channel = channel or Channel()

    def _held(self, client: int, version: int) -> ClientHeld:
        st = self.server.state
        sent = None
        if self.server.cfg.verify_sync:
            sent = st.client_copies.get(client) or self.server.setup.initial_sent()
        return ClientHeld(version, sent, st.local.get(client, {}), st.client_memory.get(client, {}))

    def _keep(self, client: int, held: ClientHeld) -> None:
        st = self.server.state
        if held.sent is not None:
            st.client_copies[client] = held.sent
        if held.local:
            st.local[client] = held.local
        if held.memory:
            st.client_memory[client] = held.memory
        else:  # an algorithm that keeps nothing (or no longer anything) for this client
            st.client_memory.pop(client, None)

    def connect(self, round: int, clients: list[int]) -> tuple[dict[int, str], dict[int, int]]:
        return {}, {}

    def train(self, round: int, orders: list[TrainOrder]) -> dict[int, TrainResult]:
        out = {}
        glob = self.server.state.global_state
        for order in orders:
            held = self.worker.sync(self._held(order.client, order.base), order)
            if held.sent is not None:  # verify_sync: the client's own copy must equal the server's state
                for k in self.server.setup.sent:
                    if not torch.equal(held.sent[k], glob[k]):
                        raise AssertionError(f"client {order.client} is out of sync with the server on {k!r}")
            result, held = self.worker.train_synced(held, round, order.client, glob)
            self._keep(order.client, held)
            if not result.error:
                result = dataclasses.replace(result, upload=self.channel.upload(round, order.client, result.upload))
            out[order.client] = result
        return out

    def broadcast(self, round: int, data: bytes, clients: list[int]) -> dict[int, str]:
        if self.server.cfg.verify_sync:
            for i in clients:
                self._keep(i, self.worker.apply(self._held(i, round - 1), round, data))
        return {}

    def evaluate(self, round: int, clients: list[int], order: Callable[[int], TrainOrder]) -> dict[int, EvalResult]:
        # every in-process client's sent keys are the global state: no catch-up to apply
        glob, st = self.server.state.global_state, self.server.state
        out = {}
        for i in clients:
            held = ClientHeld(round, None, st.local.get(i, {}))
            out[i] = self.worker.evaluate(held, TrainOrder(round + 1, i, round, "none"), glob)
        return out
