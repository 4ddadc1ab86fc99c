"""The Flower transport of the round protocol: clients are SuperNodes reached through a Flower
`Grid`; client i is the node whose node config says `partition-id = i`.

Messages (handled by `fedlowrank.flower.client_app`), all carrying the run config text and the
algorithm in their `config` record:

* `query.partition`: which partition a node holds, and which round it holds (0 for a node that
  has seen nothing of this run: a new or restarted node, or every node after a resume);
* `train`: one `TrainOrder` (its catch-up bytes in `down`); the reply carries the upload in
  `up` and the training stats, or an error;
* `train.apply`: the round's broadcast bytes for an accepted client;
* `evaluate`: per-client evaluation; `down` brings the node up to date for it (those bytes are
  counted apart, as `eval_download_bytes`), and the node keeps its state as it was.

A node that does not answer within `round_timeout` (killed, cut off) or answers with a Flower
error is left out of the round and logged with its node id; it is asked again once it is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlowrank.flower.common import pack, unpack
from fedlowrank.protocol.messages import CLIENT_DIAGNOSTICS, EvalResult, TrainOrder, TrainResult

if TYPE_CHECKING:
    from fedlowrank.protocol.server import RoundServer

__all__ = ["FlowerTransport"]

log = logging.getLogger("fedlowrank.sim")


class FlowerTransport:
    name = "flower"

    def __init__(self, server: "RoundServer", grid: Grid, run_config: str, algorithm: str,
                 round_timeout: float, nodes_timeout: float) -> None:  # fmt: skip
        self.num_clients = server.task.num_clients
        self.grid, self.run_config, self.algorithm = grid, run_config, algorithm
        self.round_timeout = round_timeout
        self.nodes: dict[int, int] = {}  # client id (partition) -> node id
        self.asked: set[int] = set()  # node ids already asked for their partition
        self.lost: set[int] = set()  # node ids that stopped answering
        self.joined: dict[int, int] = {}  # client -> round it holds, for nodes new since connect()
        self._discover(wait=nodes_timeout)

    # --- nodes --------------------------------------------------------------------------------
    def _config(self, **fields: Any) -> ConfigRecord:
        return ConfigRecord({"run-config": self.run_config, "algorithm": self.algorithm, **fields})

    def _discover(self, wait: float = 0.0) -> None:
        """Ask new nodes which partition they hold; wait up to `wait` s until every partition has one."""
        n = self.num_clients
        deadline = time.monotonic() + wait
        while True:
            new = [i for i in self.grid.get_node_ids() if i not in self.asked]
            if new:
                msgs = [Message(RecordDict({"config": self._config()}), dst_node_id=i, message_type="query.partition")
                        for i in new]  # fmt: skip
                for reply in self.grid.send_and_receive(msgs, timeout=max(5.0, deadline - time.monotonic())):
                    self._joined(reply, n)
            if len([p for p, i in self.nodes.items() if i not in self.lost]) == n or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        missing = [p for p in range(n) if p not in self.nodes]
        if missing and wait:
            log.warning("no SuperNode holds partition(s) %s: those clients will be left out when sampled", missing)

    def _joined(self, reply: Message, n: int) -> None:
        node = reply.metadata.src_node_id
        self.asked.add(node)
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", node, reply.error.reason)
            return
        rec = reply.content["result"]
        p, of = int(rec["partition-id"]), int(rec["num-partitions"])
        if not 0 <= p < n or of not in (-1, n):
            log.warning("node %d holds partition %d of %d; the task has %d clients: ignored", node, p, of, n)
        elif p in self.nodes and self.nodes[p] not in self.lost:
            log.warning("node %d and node %d both hold partition %d: keeping the first", self.nodes[p], node, p)
        else:
            self.nodes[p] = node
            self.lost.discard(node)
            self.joined[p] = int(rec["holds"]) if "holds" in rec else 0

    def _node_lost(self, client: int, why: str) -> str:
        node = self.nodes.get(client)
        if node is not None:
            self.lost.add(node)
        return f"node {node} (partition {client}) lost: {why}" if node is not None else f"no SuperNode holds partition {client}"

    def connect(self, round: int, clients: list[int]) -> tuple[dict[int, str], dict[int, int]]:
        live = set(self.grid.get_node_ids())
        for node in [i for i in self.nodes.values() if i not in live]:
            self.lost.add(node)
        self._discover()  # a SuperNode started (or restarted) since the last round
        out = {}
        for i in clients:
            node = self.nodes.get(i)
            if node is None or node in self.lost:
                out[i] = self._node_lost(i, "it stopped answering earlier")
        joined, self.joined = self.joined, {}
        return out, joined

    # --- messages -----------------------------------------------------------------------------
    def _send(self, kind: str, contents: dict[int, RecordDict]) -> dict[int, Message | None]:
        """One message per client; {client: its reply, None when none came within the timeout}."""
        ids = {}
        for client, content in contents.items():
            [mid] = self.grid.push_messages([Message(content, dst_node_id=self.nodes[client], message_type=kind)])
            ids[mid] = client
        got: dict[int, Message] = {}
        deadline = time.monotonic() + self.round_timeout
        while len(got) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([m for m, c in ids.items() if c not in got]):
                got[ids[reply.metadata.reply_to_message_id]] = reply
            if len(got) < len(ids):
                time.sleep(0.1)
        return {c: got.get(c) for c in contents}

    def _failure(self, client: int, reply: Message | None) -> str | None:
        """Why `reply` is not a result (None when it is one); a silent or broken node is marked lost."""
        if reply is None:
            return self._node_lost(client, f"no reply within {self.round_timeout:g} s")
        if reply.has_error():
            return self._node_lost(client, f"Flower error {reply.error.code}: {reply.error.reason}")
        if "result" in reply.content and "error" in reply.content["result"]:
            return str(reply.content["result"]["error"])
        return None

    def _order_content(self, order: TrainOrder, **fields: Any) -> RecordDict:
        config = self._config(round=order.round, client=order.client, catchup=order.catchup, rounds=list(order.rounds),
                              **{"from-version": order.base}, **fields)  # fmt: skip
        return RecordDict({"config": config, "down": pack(list(order.data))})

    def train(self, round: int, orders: list[TrainOrder]) -> dict[int, TrainResult]:
        replies = self._send("train", {o.client: self._order_content(o) for o in orders})
        out = {}
        for o in orders:
            reply = replies[o.client]
            why = self._failure(o.client, reply)
            if why is not None:
                holds = o.base  # it did not take the catch-up (or we cannot know): send it again
                if reply is not None and not reply.has_error() and "holds" in reply.content["result"]:
                    holds = int(reply.content["result"]["holds"])
                out[o.client] = TrainResult(o.client, holds=holds, error=why, node_id=self.nodes.get(o.client))
                continue
            m = reply.content["metrics"]
            [data] = unpack(reply.content["up"])
            out[o.client] = TrainResult(
                o.client, holds=round - 1, upload=data, bound_bytes=float(m["upload_bound_bytes"]),
                train_loss=float(m["train_loss"]), train_seconds=float(m["train_seconds"]),
                encode_seconds=float(m["encode_seconds"]), num_samples=int(m["num_samples"]),
                diagnostics={k: float(m[k]) for k in CLIENT_DIAGNOSTICS if k in m}, node_id=self.nodes[o.client],
            )  # fmt: skip
        return out

    def broadcast(self, round: int, data: bytes, clients: list[int]) -> dict[int, str]:
        down = pack([data])
        replies = self._send("train.apply", {i: RecordDict({"config": self._config(round=round, client=i), "down": down})
                                             for i in clients})  # fmt: skip
        out = {}
        for i, reply in replies.items():
            why = self._failure(i, reply)
            if why is not None:
                self._node_lost(i, "the broadcast was not acknowledged")
                out[i] = why
        return out

    def evaluate(self, round: int, clients: list[int], order: Callable[[int], TrainOrder]) -> dict[int, EvalResult]:
        reachable = [i for i in clients if i in self.nodes and self.nodes[i] not in self.lost]
        orders = {i: order(i) for i in reachable}
        replies = self._send("evaluate", {i: self._order_content(o) for i, o in orders.items()})
        out = {}
        for i, reply in replies.items():
            why = self._failure(i, reply)
            if why is not None:
                log.warning("round %d: client %d not evaluated: %s", round, i, why)
                continue
            m = reply.content["metrics"]
            out[i] = EvalResult(i, float(m["accuracy"]), float(m["loss"]), int(m["samples"]), orders[i].download_bytes)
        return out
