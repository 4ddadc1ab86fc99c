"""The client side of a round, for every transport: sync from the bytes the server sent,
train, build the upload with the algorithm and encode it; apply a broadcast; evaluate.

A client's state between calls is a `ClientHeld` the transport keeps (in-process: in the
server's checkpointed `SimState`; Flower: in the SuperNode's `context.state`). Every method
takes it and returns the new one; nothing here knows which transport carries the bytes.
"""

from __future__ import annotations

import dataclasses
import time

from fedlowrank.algorithms.base import ClientInfo
from fedlowrank.codec import decode_payload
from fedlowrank.protocol.messages import EvalResult, TrainOrder, TrainResult, client_diagnostics, encode
from fedlowrank.protocol.setup import RunSetup
from fedlowrank.protocol.state import ClientHeld, State
from fedlowrank.roundconfig import SimConfig
from fedlowrank.seeds import derive_seed
from fedlowrank.tasks.base import Task

__all__ = ["ClientWorker", "OutOfSync"]


class OutOfSync(Exception):
    """The client holds an older round than the server assumed: it needs the full state."""


class ClientWorker:
    """Runs the client side on a built `task` (the one model, loaded with each client's state)."""

    def __init__(self, task: Task, setup: RunSetup, config: SimConfig, seed: int) -> None:
        self.task, self.setup, self.cfg, self.seed = task, setup, config, int(seed)

    def fresh(self, own_copy: bool) -> ClientHeld:
        """A client that has seen nothing yet: it holds the initial state (round 0)."""
        return ClientHeld(0, self.setup.initial_sent() if own_copy else None)

    # --- sync -------------------------------------------------------------------------------
    def _apply(self, sent: State, data: bytes, full: bool = False) -> State:
        """`sent` with a broadcast (some of the sent keys) or the full state (all of them) applied;
        decoded against the sent keys' shapes, so no header can make the client allocate more."""
        payload = decode_payload(data, self.setup.sent_shapes, require_all=full)
        out = self.setup.alg.apply_broadcast(sent, payload)
        return {k: out[k] for k in self.setup.sent}

    def sync(self, held: ClientHeld, order: TrainOrder) -> ClientHeld:
        """`held` brought to round `order.round - 1` with the order's bytes."""
        if held.version < order.base:
            raise OutOfSync(f"out of sync: holds round {held.version}, the server assumed {order.base}")
        sent = held.sent
        if sent is not None:
            if order.catchup == "state":
                sent = self._apply(sent, order.data[0], full=True)
            elif order.catchup == "deltas":  # the broadcasts after `base`; skip any already applied
                for r, data in zip(order.rounds, order.data, strict=True):
                    if r > held.version:
                        sent = self._apply(sent, data)
        return dataclasses.replace(held, version=max(held.version, order.round - 1), sent=sent)

    def start_state(self, held: ClientHeld, reference: State) -> State:
        """The state a client trains or evaluates from: `reference` (the server's global state
        in-process, the initial state on a node) overlaid with its own sent and local keys."""
        return {**reference, **(held.sent or {}), **held.local}

    # --- train ------------------------------------------------------------------------------
    def train(self, held: ClientHeld, order: TrainOrder, reference: State) -> tuple[TrainResult, ClientHeld]:
        """Sync, train, build and encode the upload. Returns the result and the new held state;
        a failure is a result with `error` (after a successful sync the client keeps it)."""
        try:
            held = self.sync(held, order)
        except OutOfSync as e:
            return TrainResult(order.client, holds=-1, error=str(e)), held
        except Exception as e:  # noqa: BLE001 - bytes it cannot apply: it holds what it held
            return TrainResult(order.client, holds=order.base, error=f"catch-up failed: {type(e).__name__}: {e}"), held
        return self.train_synced(held, order.round, order.client, reference)

    def train_synced(self, held: ClientHeld, t: int, client: int, reference: State) -> tuple[TrainResult, ClientHeld]:
        """`train` for a client that already holds round `t - 1`."""
        setup, task = self.setup, self.task
        start = self.start_state(held, reference)
        try:
            task.load(start)
            t0 = time.perf_counter()
            stats = task.train(client, setup.trainable, lambda params: setup.alg.regularizer(params, start),
                               seed=derive_seed(self.seed, "train", t, client))  # fmt: skip
            trained = task.state()
            payload, memory = setup.alg.client_step(start, trained, ClientInfo(t, client, self.seed), held.memory)
            payload.meta = {**payload.meta, "round": t, "client": client}  # the server requires both
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            enc = encode(payload, self.cfg.upload_positions, self.cfg.upload_dtype)
            encode_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a client's failure must not stop the round
            return TrainResult(client, holds=held.version, error=f"training failed: {type(e).__name__}: {e}"), held
        held = dataclasses.replace(held, local={k: trained[k] for k in setup.local_keys}, memory=memory)
        result = TrainResult(client, holds=held.version, upload=enc.data, bound_bytes=enc.bound_bytes,
                             train_loss=float(stats["loss"]), train_seconds=train_s, encode_seconds=encode_s,
                             num_samples=int(task.num_samples(client)),
                             diagnostics=client_diagnostics({**stats, **payload.stats}))  # fmt: skip
        return result, held

    # --- after the round --------------------------------------------------------------------
    def apply(self, held: ClientHeld, round: int, data: bytes) -> ClientHeld:
        """Apply round `round`'s broadcast; the client then holds that round's global state."""
        if held.version != round - 1:
            raise OutOfSync(f"out of sync: holds round {held.version}, the broadcast is for round {round}")
        sent = None if held.sent is None else self._apply(held.sent, data)
        return dataclasses.replace(held, version=round, sent=sent)

    def evaluate(self, held: ClientHeld, order: TrainOrder, reference: State) -> EvalResult:
        """Evaluate the client's own model, brought up to date by `order`, on its own test split.
        `held` is not changed: the catch-up serves this evaluation only."""
        synced = self.sync(held, order)
        self.task.load(self.start_state(synced, reference))
        r = self.task.evaluate(order.client)
        return EvalResult(order.client, float(r["accuracy"]), float(r["loss"]), int(r["samples"]), order.download_bytes)
