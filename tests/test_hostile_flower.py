"""Hostile SuperNodes against the real Flower server code (RoundServer + FlowerTransport), on an
in-memory Grid: honest nodes run the real ClientApp handlers, a hostile one tampers with its
replies. No tampered reply may stop the run, be taken for another node's, or take over a
partition; the hostile client is left out and logged by node id, the others go on."""

from __future__ import annotations

import logging
import math
import uuid

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlowrank.flower import client_app
from fedlowrank.flower.transport import FlowerTransport, NodeDirectory
from fedlowrank.runconfig import dump_toml, parse_run_config
from fedlowrank.sim import Simulation

N = 3


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """What a ServerApp run sets before the server code builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
HANDLERS = {"query.partition": client_app.partition, "train": client_app.train, "train.apply": client_app.apply,
            "evaluate": client_app.evaluate}  # fmt: skip


class Node:
    """A SuperNode holding partition `p`: the real ClientApp handlers on its own context."""

    def __init__(self, node_id: int, p: int) -> None:
        self.node_id = node_id
        self.context = Context(run_id=1, node_id=node_id, node_config={"partition-id": p, "num-partitions": N},
                               state=RecordDict(), run_config={})  # fmt: skip

    def handle(self, msg: Message) -> Message | None:
        return HANDLERS[msg.metadata.message_type](msg, self.context)


class Grid:
    """Flower's Grid interface, in memory: a pushed message is handled at once."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = {n.node_id: n for n in nodes}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            reply = self.nodes[m.metadata.dst_node_id].handle(m)
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _cfg(algorithm: str = "fedavg", weighting: str | None = None):
    raw = {"name": "hostile", "algorithms": [algorithm],
           "task": {"name": "digits", "mode": "lora", "num_clients": N, "local_steps": 2},
           "sim": {"rounds": 2, "fraction": 1.0}}  # fmt: skip
    if weighting:
        raw["algorithm"] = {algorithm: {"weighting": weighting}}
    return parse_run_config(raw)


def run(nodes: list[Node], algorithm: str = "fedavg", weighting: str | None = None, grid_type: type | None = None):
    from fedlowrank.tasks import make_task

    cfg = _cfg(algorithm, weighting)
    grid = (grid_type or Grid)(nodes)
    text = dump_toml(cfg.to_mapping())
    task = make_task(cfg.task_name, cfg.task, cfg.seed)
    sim = Simulation(task, cfg.make_algorithm(algorithm), cfg.sim, seed=cfg.seed,
                     transport=lambda s: FlowerTransport(s, NodeDirectory(grid, N), text, algorithm, 0.2, 0.2))  # fmt: skip
    return sim.run()


def _replace(reply: Message, **content) -> Message:
    rd = RecordDict({k: v for k, v in reply.content.items() if k not in content})
    for k, v in content.items():
        if v is not None:
            rd[k] = v
    return Message(rd, reply_to=_original[id(reply)])


_original: dict[int, Message] = {}


class Hostile(Node):
    def __init__(self, node_id: int, p: int, tamper, kinds=("train",)) -> None:
        super().__init__(node_id, p)
        self.tamper, self.kinds = tamper, kinds

    def handle(self, msg):
        reply = super().handle(msg)
        if msg.metadata.message_type in self.kinds and reply is not None:
            _original[id(reply)] = msg
            return self.tamper(reply, msg)
        return reply


def metrics_without(key):
    def f(reply, msg):
        m = MetricRecord({k: v for k, v in reply.content["metrics"].items() if k != key})
        return _replace(reply, metrics=m)
    return f


def metrics_with(**values):
    def f(reply, msg):
        return _replace(reply, metrics=MetricRecord({**dict(reply.content["metrics"].items()), **values}))
    return f


def arrays(n: int, stype: str = "fedlowrank.codec/v1"):
    def f(reply, msg):
        data = bytes(reply.content["up"]["0"].data)
        return _replace(reply, up=ArrayRecord({str(i): Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)
                                               for i in range(n)}))  # fmt: skip
    return f


TRAIN_TAMPERS = {
    "no metrics": lambda r, m: _replace(r, metrics=None),
    "no up": lambda r, m: _replace(r, up=None),
    "0 arrays": arrays(0),
    "2 arrays": arrays(2),
    "wrong stype": arrays(1, "numpy.ndarray"),
    "a metric missing": metrics_without("train_seconds"),
    "negative num_samples": metrics_with(num_samples=-5),
    "10^12 num_samples": metrics_with(num_samples=10**12),
    "nan train_loss": metrics_with(train_loss=math.nan),
    "a string result": lambda r, m: Message(RecordDict({"result": ConfigRecord({"nonsense": "x"})}), reply_to=m),
    "an error with a bad holds": lambda r, m: Message(RecordDict({"result": ConfigRecord({"error": "no", "holds": 10**9})}),
                                                      reply_to=m),
}  # fmt: skip


@pytest.mark.parametrize("what", sorted(TRAIN_TAMPERS))
def test_a_tampered_train_reply_leaves_that_client_out_and_the_run_goes_on(what, caplog):
    nodes = [Node(101, 0), Hostile(102, 1, TRAIN_TAMPERS[what]), Node(103, 2)]
    with caplog.at_level(logging.WARNING, logger="fedlowrank"):
        records = run(nodes, weighting="samples" if "num_samples" in what else None)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["accepted"] == 2 and [d["client"] for d in r["dropped"]] == [1], r["dropped"]
        assert "node 102" in r["dropped"][0]["reason"]
        assert math.isfinite(r["eval"]["accuracy"])
    assert "client 1 left out" in caplog.text


def test_garbage_partition_apply_and_evaluate_replies_do_not_stop_the_run():
    def garbage(reply, msg):
        return Message(RecordDict({"result": ConfigRecord({"partition-id": "zero", "holds": -7})}), reply_to=msg)

    records = run([Node(101, 0), Hostile(102, 1, garbage, kinds=("query.partition",)), Node(103, 2)])
    assert all(r["accepted"] == 2 and [d["client"] for d in r["dropped"]] == [1] for r in records)
    assert "no SuperNode holds partition 1" in records[0]["dropped"][0]["reason"]

    def bad_ack(reply, msg):
        return Message(RecordDict({"result": ConfigRecord({"round": "yes"})}), reply_to=msg)

    records = run([Node(101, 0), Hostile(102, 1, bad_ack, kinds=("train.apply",)), Node(103, 2)])
    assert [r["round"] for r in records] == [1, 2] and records[0]["accepted"] == 3
    assert records[1]["dropped"] and records[1]["dropped"][0]["client"] == 1  # it never acknowledged: lost

    def bad_eval(reply, msg):
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": 7.0, "loss": -1.0, "samples": -3})}), reply_to=msg)

    records = run([Node(101, 0), Hostile(102, 1, bad_eval, kinds=("evaluate",)), Node(103, 2)], algorithm="fedper")
    for r in records:
        assert r["eval"]["clients"] == 2 and 0 <= r["eval"]["accuracy"] <= 1  # the bad evaluation is left out


def test_a_reply_from_another_node_is_not_taken_for_it():
    class Spoof(Node):
        def handle(self, msg):
            reply = super().handle(msg)
            if msg.metadata.message_type == "train":
                reply.metadata.__dict__["_src_node_id"] = 101  # claims to be node 101
            return reply

    records = run([Node(101, 0), Spoof(102, 1), Node(103, 2)])
    for r in records:
        assert [d["client"] for d in r["dropped"]] == [1] and r["accepted"] == 2


def test_a_partition_cannot_be_taken_over_and_a_contested_one_is_refused(caplog):
    # node 104 answers for partition 1, which the live node 102 already holds: refused
    class LateClaim(Node):
        pass

    nodes = [Node(101, 0), Node(102, 1), Node(103, 2)]
    cfg = _cfg()
    grid = Grid(nodes)
    directory = NodeDirectory(grid, N)
    directory.discover(ConfigRecord({"run-config": dump_toml(cfg.to_mapping()), "algorithm": "fedavg"}))
    assert directory.nodes == {0: 101, 1: 102, 2: 103}
    grid.nodes[104] = LateClaim(104, 1)
    with caplog.at_level(logging.WARNING, logger="fedlowrank"):
        directory.discover(ConfigRecord({"run-config": dump_toml(cfg.to_mapping()), "algorithm": "fedavg"}))
    assert directory.nodes[1] == 102 and "[104] claim partition 1, which node 102 holds: refused" in caplog.text
    # two nodes claiming one partition at once: neither gets it
    records = run([Node(101, 0), Node(102, 1), Node(105, 1), Node(103, 2)])
    assert all([d["client"] for d in r["dropped"]] == [1] for r in records)
    assert "no SuperNode holds partition 1" in records[0]["dropped"][0]["reason"]


@pytest.mark.parametrize("refusal", [[None], []], ids=["none-id", "no-ids"])
def test_a_message_the_superlink_does_not_take_leaves_that_client_out(refusal, caplog):
    """Flower's push_messages answers None for a malformed message and [] for one too large:
    that client is left out of the round (its node is asked again later), the run goes on."""

    class Refusing(Grid):
        def push_messages(self, messages):
            messages = list(messages)
            if messages[0].metadata.message_type == "train" and messages[0].metadata.dst_node_id == 102:
                return list(refusal)
            return super().push_messages(messages)

    with caplog.at_level(logging.WARNING, logger="fedlowrank"):
        records = run([Node(101, 0), Node(102, 1), Node(103, 2)], grid_type=Refusing)
    assert records[0]["accepted"] == 2 and [d["client"] for d in records[0]["dropped"]] == [1]
    assert "did not take the train message for node 102" in caplog.text
