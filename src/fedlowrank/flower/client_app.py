"""The Flower ClientApp: one SuperNode is one client (its data partition is `partition-id`).

It drives the in-process runtime's own objects: a `Simulation` built from the run config the
server sends (same task, same algorithm with the model's local keys, same seeds) trains with
`Simulation._train_client` and encodes with the same codec settings. Nothing of any algorithm
is written here.

Messages (all from `fedlowrank.flower.server_app`):

* `query.partition`: reply with this node's partition id and partition count.
* `train`: `down` holds the catch-up payloads (the full state or the missed broadcasts, as the
  server's ledger decided); apply them to the synced state kept in `context.state`, train,
  reply with the encoded upload in `up` (an `Array` of stype `STYPE`) and the training stats.
* `train.apply`: `down` holds the round's broadcast; apply it, so this client holds the round's
  global state (the same decoded bytes the server applied).

What a client keeps between messages (`context.state`, never sent): the sent keys as of the
last round it synced to, that round, its local keys, and the algorithm's client memory
(`Algorithm.client_step`: upload error feedback's remainder). All of it is lost with the node.
"""

from __future__ import annotations

import logging
import time
import tomllib
import traceback

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlowrank.codec import decode_payload
from fedlowrank.flower.common import pack, state_from_bytes, state_to_bytes, unpack
from fedlowrank.runconfig import parse_run_config
from fedlowrank.sim.runtime import Simulation, client_diagnostics, encode
from fedlowrank.tasks import make_task

__all__ = ["app"]

log = logging.getLogger("fedlowrank.flower")
app = ClientApp()

_SIMS: dict[tuple[str, str], Simulation] = {}  # a ClientApp process may serve many messages


def _simulation(msg: Message) -> Simulation:
    cfg_rec = msg.content["config"]
    key = (str(cfg_rec["run-config"]), str(cfg_rec["algorithm"]))
    if key not in _SIMS:
        cfg = parse_run_config(tomllib.loads(key[0]))
        task = make_task(cfg.task_name, cfg.task, cfg.seed)
        _SIMS.clear()  # one run at a time per process
        _SIMS[key] = Simulation(task, cfg.make_algorithm(key[1]), cfg.sim, seed=cfg.seed)
    return _SIMS[key]


def _partition(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config "
                         "(start it with --node-config \"partition-id=0 num-partitions=N\")")  # fmt: skip
    return int(context.node_config["partition-id"])


# --- the client's private state ----------------------------------------------------------------
def _load(sim: Simulation, context: Context) -> tuple[int, dict, dict, dict]:
    """(round synced to, sent keys at that round, local keys, algorithm memory)."""
    if "fedlowrank" not in context.state:
        return 0, {k: v.clone() for k, v in sim._initial_sent.items()}, {}, {}
    rec = context.state["fedlowrank"]
    memory = state_from_bytes(rec["memory"]) if "memory" in rec else {}
    return int(rec["version"]), state_from_bytes(rec["sent"]), state_from_bytes(rec["local"]), memory


def _save(context: Context, version: int, sent: dict, local: dict, memory: dict) -> None:
    context.state["fedlowrank"] = ConfigRecord({"version": version, "sent": state_to_bytes(sent),
                                                "local": state_to_bytes(local), "memory": state_to_bytes(memory)})  # fmt: skip


def _apply(sim: Simulation, sent: dict, data: bytes, shapes: dict | None = None) -> dict:
    out = sim.alg.apply_broadcast(sent, decode_payload(data, shapes))
    return {k: out[k] for k in sim.sent}


def _error(msg: Message, text: str) -> Message:
    return Message(RecordDict({"result": ConfigRecord({"error": text})}), reply_to=msg)


# --- handlers ----------------------------------------------------------------------------------
@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    rec = ConfigRecord({"partition-id": _partition(context),
                        "num-partitions": int(context.node_config.get("num-partitions", -1))})  # fmt: skip
    return Message(RecordDict({"result": rec}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        sim = _simulation(msg)
        cfg = msg.content["config"]
        t, client = int(cfg["round"]), int(cfg["client"])
        if client != _partition(context):
            return _error(msg, f"message for client {client}, but this node holds partition {_partition(context)}")
        version, sent, local, memory = _load(sim, context)
        base = int(cfg["from-version"])
        if version < base:
            return _error(msg, f"out of sync: holds round {version}, the server assumed {base}")
        down = unpack(msg.content["down"])
        if cfg["catchup"] == "state":
            sent = _apply(sim, sent, down[0], sim.sent_shapes)
        else:  # the broadcasts of rounds base+1 .. t-1; skip any this client already applied
            for r, data in zip(list(cfg["rounds"]), down, strict=True):
                if r > version:
                    sent = _apply(sim, sent, data)
        threads = torch.get_num_threads()
        if sim.threads:  # 0: the task leaves torch's default (every task but the tiny ones)
            torch.set_num_threads(sim.threads)
        try:
            start = {**sim.state.global_state, **sent, **local}
            payload, trained, stats, memory = sim._train_client(client, t, start, memory)
            t0 = time.perf_counter()
            enc = encode(payload, sim.cfg.upload_positions, sim.cfg.upload_dtype)
            stats["encode_seconds"] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        local = {k: trained[k] for k in sim.local_keys}
        _save(context, t - 1, sent, local, memory)
        metrics = MetricRecord({
            "train_loss": float(stats["loss"]), "train_seconds": float(stats["train_seconds"]),
            "encode_seconds": float(stats["encode_seconds"]), "num_samples": int(sim.task.num_samples(client)),
            "upload_bound_bytes": float(enc.bound_bytes), **client_diagnostics(stats),
        })  # fmt: skip
        return Message(RecordDict({"up": pack([enc.data]), "metrics": metrics}), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - reported to the server, which leaves this client out
        log.warning("training failed: %s", traceback.format_exc())
        return _error(msg, f"training failed: {type(e).__name__}: {e}")


@app.train("apply")
def apply(msg: Message, context: Context) -> Message:
    sim = _simulation(msg)
    t = int(msg.content["config"]["round"])
    version, sent, local, memory = _load(sim, context)
    if version != t - 1:
        return _error(msg, f"out of sync: holds round {version}, the broadcast is for round {t}")
    _save(context, t, _apply(sim, sent, unpack(msg.content["down"])[0]), local, memory)
    return Message(RecordDict({"result": ConfigRecord({"round": t})}), reply_to=msg)
