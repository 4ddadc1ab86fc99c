"""The Flower ClientApp: one SuperNode is one client (its data partition is `partition-id`).

Every handler is a thin wrapper around the round protocol's client side
(`fedlowrank.protocol.client.ClientWorker`), built from the run config the server sends (same
task, same algorithm with the model's local keys, same seeds). Nothing of any algorithm or of
the round's rules is written here; the messages are described in `fedlowrank.flower.transport`.

What a client keeps between messages (`context.state`, one record per algorithm of the run,
never sent) is its `ClientHeld`: the sent keys as of the last round it synced to, that round,
its local keys, and the algorithm's client memory (upload error feedback's remainder). All of it
is lost with the node; the server learns that from the round the node says it holds.
"""

from __future__ import annotations

import logging
import tomllib
import traceback

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlowrank.flower.common import pack, state_from_bytes, state_to_bytes, unpack
from fedlowrank.protocol.client import ClientWorker, OutOfSync
from fedlowrank.protocol.messages import TrainOrder
from fedlowrank.protocol.setup import RunSetup
from fedlowrank.protocol.state import ClientHeld
from fedlowrank.runconfig import parse_run_config
from fedlowrank.tasks import make_task

__all__ = ["app"]

log = logging.getLogger("fedlowrank.flower")
app = ClientApp()

_WORKERS: dict[tuple[str, str], tuple[ClientWorker, int]] = {}  # a ClientApp process serves many messages
_TASKS: dict[str, object] = {}  # the built task of the run config (shared by its algorithms, as in-process)


def _worker(msg: Message) -> tuple[ClientWorker, int]:
    """The client side for the message's run config and algorithm, and its torch thread count."""
    cfg_rec = msg.content["config"]
    key = (str(cfg_rec["run-config"]), str(cfg_rec["algorithm"]))
    if key not in _WORKERS:
        cfg = parse_run_config(tomllib.loads(key[0]))
        if key[0] not in _TASKS:
            _TASKS.clear()  # one run at a time per process
            _TASKS[key[0]] = make_task(cfg.task_name, cfg.task, cfg.seed).build()
        task = _TASKS[key[0]]
        setup = RunSetup.of(task, cfg.make_algorithm(key[1]), cfg.seed)
        _WORKERS.clear()
        _WORKERS[key] = (ClientWorker(task, setup, cfg.sim, cfg.seed), cfg.sim.threads or task.default_threads)
    return _WORKERS[key]


def _partition(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config "
                         "(start it with --node-config \"partition-id=0 num-partitions=N\")")  # fmt: skip
    return int(context.node_config["partition-id"])


# --- the client's private state ----------------------------------------------------------------
def _slot(msg: Message) -> str:
    return f"fedlowrank:{msg.content['config']['algorithm']}"


def _load(worker: ClientWorker, msg: Message, context: Context) -> ClientHeld:
    if _slot(msg) not in context.state:
        return worker.fresh(own_copy=True)
    rec = context.state[_slot(msg)]
    return ClientHeld(int(rec["version"]), state_from_bytes(rec["sent"]), state_from_bytes(rec["local"]),
                      state_from_bytes(rec["memory"]))  # fmt: skip


def _save(msg: Message, context: Context, held: ClientHeld) -> None:
    context.state[_slot(msg)] = ConfigRecord({"version": held.version, "sent": state_to_bytes(held.sent or {}),
                                              "local": state_to_bytes(held.local),
                                              "memory": state_to_bytes(held.memory)})  # fmt: skip


def _order(msg: Message) -> TrainOrder:
    cfg = msg.content["config"]
    return TrainOrder(int(cfg["round"]), int(cfg["client"]), int(cfg["from-version"]), str(cfg["catchup"]),
                      tuple(int(r) for r in cfg["rounds"]), tuple(unpack(msg.content["down"])))  # fmt: skip


def _error(msg: Message, text: str, **fields) -> Message:
    return Message(RecordDict({"result": ConfigRecord({"error": text, **fields})}), reply_to=msg)


class _Threads:
    """The task's torch thread count for the duration of a handler."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:  # 0: the task leaves torch's default (every task but the tiny ones)
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)


# --- handlers ----------------------------------------------------------------------------------
@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    held = int(context.state[_slot(msg)]["version"]) if _slot(msg) in context.state else 0
    rec = ConfigRecord({"partition-id": _partition(context), "holds": held,
                        "num-partitions": int(context.node_config.get("num-partitions", -1))})  # fmt: skip
    return Message(RecordDict({"result": rec}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        worker, threads = _worker(msg)
        order = _order(msg)
        if order.client != _partition(context):
            return _error(msg, f"message for client {order.client}, but this node holds partition {_partition(context)}")
        held = _load(worker, msg, context)
        with _Threads(threads):
            result, held = worker.train(held, order, worker.setup.init)
        _save(msg, context, held)
        if result.error:
            return _error(msg, result.error, holds=result.holds)
        metrics = MetricRecord({
            "train_loss": result.train_loss, "train_seconds": result.train_seconds,
            "encode_seconds": result.encode_seconds, "num_samples": result.num_samples,
            "upload_bound_bytes": result.bound_bytes, **result.diagnostics,
        })  # fmt: skip
        return Message(RecordDict({"up": pack([result.upload]), "metrics": metrics}), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - reported to the server, which leaves this client out
        log.warning("training failed: %s", traceback.format_exc())
        return _error(msg, f"training failed: {type(e).__name__}: {e}")


@app.train("apply")
def apply(msg: Message, context: Context) -> Message:
    try:
        worker, _ = _worker(msg)
        t = int(msg.content["config"]["round"])
        _save(msg, context, worker.apply(_load(worker, msg, context), t, unpack(msg.content["down"])[0]))
        return Message(RecordDict({"result": ConfigRecord({"round": t})}), reply_to=msg)
    except OutOfSync as e:
        return _error(msg, str(e))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        worker, threads = _worker(msg)
        with _Threads(threads):
            r = worker.evaluate(_load(worker, msg, context), _order(msg), worker.setup.init)
        metrics = MetricRecord({"accuracy": r.accuracy, "loss": r.loss, "samples": r.samples})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - reported to the server, which evaluates the others
        return _error(msg, f"evaluation failed: {type(e).__name__}: {e}")
