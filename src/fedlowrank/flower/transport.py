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
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlowrank.flower.common import pack
from fedlowrank.flower.replies import MAX_TEXT, BadReply, ack_reply, eval_reply, partition_reply, train_reply
from fedlowrank.protocol.messages import CLIENT_DIAGNOSTICS, EvalResult, TrainOrder, TrainResult

if TYPE_CHECKING:
    from fedlowrank.protocol.server import RoundServer

__all__ = ["FlowerTransport", "NodeDirectory"]

log = logging.getLogger("fedlowrank.sim")

K = TypeVar("K")


def exchange(grid: Grid, messages: dict[K, Message], timeout: float) -> dict[K, Message | None]:
    """Push `messages` and wait up to `timeout` s for their replies: {key: reply, or None when
    none came, or the SuperLink did not take the message}. A reply counts only if it comes from
    the node its message went to.

    Polls from 5 ms, backing off to 0.1 s: replies often come within milliseconds, and Flower's
    own `Grid.send_and_receive` sleeps 3 s between polls."""
    ids: dict[str, K] = {}
    dst = {k: m.metadata.dst_node_id for k, m in messages.items()}
    for key, msg in messages.items():
        pushed = list(grid.push_messages([msg]))
        if len(pushed) == 1 and pushed[0]:
            ids[pushed[0]] = key
        else:
            log.warning("the SuperLink did not take the %s message for node %d", msg.metadata.message_type, dst[key])
    got: dict[K, Message] = {}
    deadline = time.monotonic() + timeout
    wait = 0.005
    while len(got) < len(ids) and time.monotonic() < deadline:
        for reply in grid.pull_messages([m for m, k in ids.items() if k not in got]):
            key = ids.get(reply.metadata.reply_to_message_id)
            if key is None or key in got:
                continue
            if reply.metadata.src_node_id != dst[key]:
                log.warning("a reply to a %s message for node %d came from node %d: ignored",
                            reply.metadata.message_type, dst[key], reply.metadata.src_node_id)  # fmt: skip
                continue
            got[key] = reply
        if len(got) < len(ids):
            time.sleep(wait)
            wait = min(0.1, wait * 1.5)
    return {k: got.get(k) for k in messages}


class NodeDirectory:
    """Which SuperNode holds which data partition, shared by the transports of one ServerApp
    run (every algorithm of the run): nodes are asked once, not once per algorithm."""

    def __init__(self, grid: Grid, num_clients: int) -> None:
        self.grid, self.num_clients = grid, num_clients
        self.nodes: dict[int, int] = {}  # client id (partition) -> node id
        self.asked: set[int] = set()  # node ids already asked for their partition
        self.lost: set[int] = set()  # node ids that stopped answering

    def live(self, client: int) -> bool:
        return client in self.nodes and self.nodes[client] not in self.lost

    def discover(self, config: ConfigRecord, wait: float = 0.0) -> dict[int, int]:
        """Ask new nodes which partition they hold; wait up to `wait` s until every partition has
        one. Returns {partition: the round its node holds of `config`'s algorithm} for nodes new now.

        A partition is claimed once: while its node is live no other node can take it over; two
        nodes claiming one free partition in the same answer batch are both refused (neither can
        be told to be the honest one)."""
        n = self.num_clients
        deadline = time.monotonic() + wait
        joined: dict[int, int] = {}
        while True:
            present = set(self.grid.get_node_ids())
            self.lost.update(i for i in self.nodes.values() if i not in present)  # gone from the SuperLink
            new = [i for i in present if i not in self.asked]
            if new:
                msgs = {i: Message(RecordDict({"config": config}), dst_node_id=i, message_type="query.partition") for i in new}
                claims: dict[int, list[tuple[int, int]]] = {}
                replies = exchange(self.grid, msgs, timeout=max(5.0, deadline - time.monotonic()))
                for reply in (r for r in replies.values() if r is not None):
                    claim = self._claim(reply)
                    if claim is not None:
                        claims.setdefault(claim[0], []).append((reply.metadata.src_node_id, claim[1]))
                for p, nodes in claims.items():
                    if self.live(p):
                        log.warning("node(s) %s claim partition %d, which node %d holds: refused",
                                    [i for i, _ in nodes], p, self.nodes[p])  # fmt: skip
                    elif len(nodes) > 1:
                        log.warning("nodes %s all claim partition %d: none of them gets it", [i for i, _ in nodes], p)
                    else:
                        [(node, holds)] = nodes
                        self.nodes[p] = node
                        self.lost.discard(node)
                        joined[p] = holds
            if sum(self.live(p) for p in range(n)) == n or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        missing = [p for p in range(n) if p not in self.nodes]
        if missing and wait:
            log.warning("no SuperNode holds partition(s) %s: those clients will be left out when sampled", missing)
        return joined

    def _claim(self, reply: Message) -> tuple[int, int] | None:
        """(partition, round held) that a `query.partition` reply claims, or None (logged). The
        reply comes from the node that was asked (`exchange` takes no other)."""
        node = reply.metadata.src_node_id
        self.asked.add(node)
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", node, str(reply.error.reason)[:MAX_TEXT])
            return None
        try:
            p, of, holds = partition_reply(reply, self.num_clients)
        except BadReply as e:
            log.warning("node %d: bad partition reply (%s): ignored", node, e)
            return None
        if of not in (-1, self.num_clients):
            log.warning("node %d holds partition %d of %d; the task has %d clients: ignored", node, p, of, self.num_clients)
            return None
        return p, holds


class FlowerTransport:
    name = "flower"

    def __init__(self, server: "RoundServer", directory: NodeDirectory, run_config: str, algorithm: str,
                 round_timeout: float, nodes_timeout: float) -> None:  # fmt: skip
        self.num_clients = server.task.num_clients
        if directory.num_clients != self.num_clients:
            raise ValueError(f"the node directory is for {directory.num_clients} clients, the task has {self.num_clients}")
        self.directory, self.grid = directory, directory.grid
        self.run_config, self.algorithm = run_config, algorithm
        self.round_timeout = round_timeout
        # context.state lives as long as a Flower run and each algorithm runs once in it: every
        # node starts this algorithm holding nothing (round 0), after a resume too
        self.joined = dict.fromkeys(range(self.num_clients), 0)
        directory.discover(self._config(), wait=nodes_timeout)

    @property
    def nodes(self) -> dict[int, int]:
        return self.directory.nodes

    # --- nodes --------------------------------------------------------------------------------
    def _config(self, **fields: Any) -> ConfigRecord:
        return ConfigRecord({"run-config": self.run_config, "algorithm": self.algorithm, **fields})

    def _node_lost(self, client: int, why: str) -> str:
        node = self.nodes.get(client)
        if node is not None:
            self.directory.lost.add(node)
        return f"node {node} (partition {client}) lost: {why}" if node is not None else f"no SuperNode holds partition {client}"

    def connect(self, round: int, clients: list[int]) -> tuple[dict[int, str], dict[int, int]]:
        for p, v in self.directory.discover(self._config()).items():  # SuperNodes (re)started since
            self.joined[p] = min(v, self.joined.get(p, v))
        out = {i: self._node_lost(i, "it stopped answering earlier") for i in clients if not self.directory.live(i)}
        joined, self.joined = self.joined, {}
        return out, joined

    # --- messages -----------------------------------------------------------------------------
    def _send(self, kind: str, contents: dict[int, RecordDict]) -> dict[int, Message | None]:
        """One message per client; {client: its reply, None when none came within the timeout}."""
        return exchange(self.grid, {c: Message(content, dst_node_id=self.nodes[c], message_type=kind)
                                    for c, content in contents.items()}, self.round_timeout)  # fmt: skip

    def _who(self, client: int) -> str:
        return f"node {self.nodes.get(client)} (partition {client})"

    def _failure(self, client: int, reply: Message | None) -> str | None:
        """Why there is no usable reply (None when there is one); a silent node or one that
        answers with a Flower error is marked lost."""
        if reply is None:
            return self._node_lost(client, f"no reply within {self.round_timeout:g} s")
        if reply.has_error():
            return self._node_lost(client, f"Flower error {reply.error.code}: {str(reply.error.reason)[:MAX_TEXT]}")
        return None

    def _order_content(self, order: TrainOrder) -> RecordDict:
        config = self._config(round=order.round, client=order.client, catchup=order.catchup, rounds=list(order.rounds),
                              **{"from-version": order.base})  # fmt: skip
        return RecordDict({"config": config, "down": pack(list(order.data))})

    def train(self, round: int, orders: list[TrainOrder]) -> dict[int, TrainResult]:
        replies = self._send("train", {o.client: self._order_content(o) for o in orders})
        out = {}
        for o in orders:
            reply, node = replies[o.client], self.nodes.get(o.client)
            why = self._failure(o.client, reply)
            if why is not None:  # it did not take the catch-up (or we cannot know): send it again
                out[o.client] = TrainResult(o.client, holds=o.base, error=why, node_id=node)
                continue
            try:
                kind, got = train_reply(reply, round)
            except BadReply as e:  # it may or may not hold the catch-up: the full state next time
                out[o.client] = TrainResult(o.client, holds=-1, error=f"{self._who(o.client)}: bad reply: {e}", node_id=node)
                continue
            if kind == "error":
                text, holds = got
                out[o.client] = TrainResult(o.client, holds=o.base if holds is None else holds,
                                            error=f"{self._who(o.client)}: {text}", node_id=node)  # fmt: skip
                continue
            data, m = got
            out[o.client] = TrainResult(
                o.client, holds=round - 1, upload=data, bound_bytes=m["upload_bound_bytes"], train_loss=m["train_loss"],
                train_seconds=m["train_seconds"], encode_seconds=m["encode_seconds"], num_samples=m["num_samples"],
                diagnostics={k: m[k] for k in CLIENT_DIAGNOSTICS if k in m}, node_id=node,
            )  # fmt: skip
        return out

    def broadcast(self, round: int, data: bytes, clients: list[int]) -> dict[int, str]:
        down = pack([data])
        replies = self._send("train.apply", {i: RecordDict({"config": self._config(round=round, client=i), "down": down})
                                             for i in clients})  # fmt: skip
        out = {}
        for i, reply in replies.items():
            why = self._failure(i, reply)
            if why is None:
                try:
                    why = ack_reply(reply, round)
                except BadReply as e:
                    why = f"bad reply: {e}"
                if why is not None:
                    why = f"{self._who(i)}: {why}"
            if why is not None:  # it may hold anything: lost until it is discovered again
                self._node_lost(i, "the broadcast was not acknowledged")
                out[i] = why
        return out

    def evaluate(self, round: int, clients: list[int], order: Callable[[int], TrainOrder]) -> dict[int, EvalResult]:
        reachable = [i for i in clients if self.directory.live(i)]
        orders = {i: order(i) for i in reachable}
        replies = self._send("evaluate", {i: self._order_content(o) for i, o in orders.items()})
        out = {}
        for i, reply in replies.items():
            why = self._failure(i, reply)
            got = None
            if why is None:
                try:
                    got = eval_reply(reply, round)
                except BadReply as e:
                    why = f"bad reply: {e}"
                if isinstance(got, str):
                    why, got = got, None
            if got is None:
                log.warning("round %d: client %d not evaluated: %s: %s", round, i, self._who(i), why)
                continue
            accuracy, loss, samples = got
            out[i] = EvalResult(i, accuracy, loss, samples, orders[i].download_bytes)
        return out
