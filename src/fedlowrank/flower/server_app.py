"""The Flower ServerApp: the in-process runtime's rounds, with clients on SuperNodes.

`FlowerSimulation` is the in-process `Simulation` (same sampling seeds, same catch-up rule,
same ledger records, same checkpoints) whose clients are Flower nodes: round t

  1. samples clients with `Simulation.sample(t)`; client i is the node whose `partition-id` is i;
  2. works out each one's catch-up with `Simulation._catch_up` and sends it, in one `train`
     message per client, those very bytes (the full state or the missed broadcasts);
  3. waits up to `round-timeout` for the replies; a node that does not answer (killed, cut off)
     or answers with an error is left out of the round and logged with its node id;
  4. decodes each upload against the expected shapes, aggregates with the algorithm, encodes
     the broadcast, applies its decoded bytes to the global state and sends those bytes to every
     accepted client in a `train.apply` message (only acknowledged clients count as synced);
  5. evaluates the global state on the server, every `eval_every` rounds and after the last.

The run directory (metrics.jsonl, checkpoint.pt, events.log, summaries) is written by the same
`RunDir` code as the in-process runtime's, so `fedlowrank report` reads both alike.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlowrank.config import ConfigError
from fedlowrank.flower.common import FlowerRunOptions, pack, unpack
from fedlowrank.payload import Payload
from fedlowrank.runconfig import RunConfig, dump_toml, load_run_config
from fedlowrank.sim.experiment import finish_run, record_round
from fedlowrank.sim.rundir import RunDir, atomic_write
from fedlowrank.sim.runtime import SimState, Simulation, client_diagnostics
from fedlowrank.tasks import make_task

__all__ = ["app", "make_server_app", "FlowerSimulation", "run_on_grid"]

log = logging.getLogger("fedlowrank.sim")  # the run directory's events.log listens here


class FlowerSimulation(Simulation):
    """`Simulation` whose clients train on Flower nodes reached through `grid`."""

    def __init__(self, task, algorithm, config, seed, grid: Grid, run_config: str, algorithm_name: str,
                 round_timeout: float, nodes_timeout: float, on_round=None) -> None:  # fmt: skip
        super().__init__(task, algorithm, config, seed=seed, on_round=on_round)
        if self.personal:
            raise ConfigError("sim.evaluation: per-client evaluation (algorithms or models with local keys) "
                              "is not supported on the Flower runtime yet; use the in-process runtime")  # fmt: skip
        self.grid = grid
        self.run_config = run_config
        self.algorithm_name = algorithm_name
        self.round_timeout = round_timeout
        self.nodes: dict[int, int] = {}  # client id (partition) -> node id
        self.asked: set[int] = set()  # node ids already asked for their partition
        self.lost: set[int] = set()  # node ids that stopped answering
        self._discover(wait=nodes_timeout)

    # --- nodes --------------------------------------------------------------------------------
    def _config(self, **fields: Any) -> ConfigRecord:
        return ConfigRecord({"run-config": self.run_config, "algorithm": self.algorithm_name, **fields})

    def _discover(self, wait: float = 0.0) -> None:
        """Ask new nodes which partition they hold; wait up to `wait` s until every partition has one."""
        n = self.task.num_clients
        deadline = time.monotonic() + wait
        while True:
            new = [i for i in self.grid.get_node_ids() if i not in self.asked]
            if new:
                msgs = [Message(RecordDict({"config": self._config()}), dst_node_id=i, message_type="query.partition")
                        for i in new]  # fmt: skip
                for reply in self.grid.send_and_receive(msgs, timeout=max(5.0, deadline - time.monotonic())):
                    node = reply.metadata.src_node_id
                    self.asked.add(node)
                    if reply.has_error():
                        log.warning("node %d did not say its partition: %s", node, reply.error.reason)
                        continue
                    rec = reply.content["result"]
                    p, of = int(rec["partition-id"]), int(rec["num-partitions"])
                    if not 0 <= p < n or of not in (-1, n):
                        log.warning("node %d holds partition %d of %d; the task has %d clients: ignored", node, p, of, n)
                    elif p in self.nodes and self.nodes[p] not in self.lost:
                        log.warning("node %d and node %d both hold partition %d: keeping the first", self.nodes[p], node, p)
                    else:
                        self.nodes[p] = node
                        self.lost.discard(node)
            if len([p for p, i in self.nodes.items() if i not in self.lost]) == n or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        missing = [p for p in range(n) if p not in self.nodes]
        if missing and wait:
            log.warning("no SuperNode holds partition(s) %s: those clients will be left out when sampled", missing)

    def _node_lost(self, t: int, client: int, why: str) -> str:
        node = self.nodes.get(client)
        if node is not None:
            self.lost.add(node)
        return f"node {node} (partition {client}) lost: {why}" if node is not None else f"no SuperNode holds partition {client}"

    # --- one round ----------------------------------------------------------------------------
    def _catch_up_bytes(self, client: int, round: int, cache: dict) -> tuple[dict[str, Any], list[int], list[bytes], int]:
        """`Simulation._catch_up`, plus the very bytes it counted.
        Returns (record fields, rounds of the broadcasts sent, their bytes, old version)."""
        v = int(self.state.versions[client])
        sent, bound, what = self._catch_up(client, round, cache)
        rounds, data = [], []
        if what == "state":
            data = [cache["full"][1].data]
        elif what == "deltas":
            rounds, data = zip(*[(r, b) for r, b, _ in self.state.history if v < r <= round - 1])
        if sum(map(len, data)) != sent:
            raise RuntimeError("catch-up bytes differ from the ledger's count")
        return {"download_bytes": sent, "download_bound_bytes": bound, "catchup": what}, list(rounds), list(data), v

    def round(self, t: int) -> dict[str, Any]:
        st = self.state
        wall0 = time.perf_counter()
        live = set(self.grid.get_node_ids())
        for node in [i for i in self.nodes.values() if i not in live]:
            self.lost.add(node)
        self._discover()  # a SuperNode started (or restarted) since the last round
        clients = self.sample(t)
        records: list[dict[str, Any]] = []
        msgs: dict[str, tuple[dict[str, Any], int]] = {}  # message id -> (record, old version)
        server_s, cache = 0.0, {}
        for i in clients:
            rec: dict[str, Any] = {"client": i, "status": "ok", "upload_bytes": 0, "upload_bound_bytes": 0.0}
            records.append(rec)
            node = self.nodes.get(i)
            if node is None or node in self.lost:
                rec.update(download_bytes=0, download_bound_bytes=0.0, catchup="none", status="failed",
                           reason=self._node_lost(t, i, "it stopped answering earlier"))  # fmt: skip
                log.warning("round %d: client %d left out: %s", t, i, rec["reason"])
                continue
            t0 = time.perf_counter()
            fields, rounds, data, v = self._catch_up_bytes(i, t, cache)
            server_s += time.perf_counter() - t0
            rec.update(fields, node_id=node)
            config = self._config(round=t, client=i, catchup=fields["catchup"], rounds=rounds, **{"from-version": v})
            content = RecordDict({"config": config, "down": pack(data)})
            [mid] = self.grid.push_messages([Message(content, dst_node_id=node, message_type="train")])
            msgs[mid] = (rec, v)

        replies = self._collect(list(msgs))
        uploads: list[Payload] = []
        weights: list[int] = []
        accepted: list[int] = []
        for mid, (rec, v) in msgs.items():  # in client order, as the in-process runtime
            i, reply = rec["client"], replies.get(mid)
            reason = None
            if reply is None:
                reason = self._node_lost(t, i, f"no reply within {self.round_timeout:g} s")
            elif reply.has_error():
                reason = self._node_lost(t, i, f"Flower error {reply.error.code}: {reply.error.reason}")
            elif "result" in reply.content and "error" in reply.content["result"]:
                reason = str(reply.content["result"]["error"])
            if reason is not None:
                st.versions[i] = v  # it did not take the catch-up (or we cannot know): send it again
                if reason.startswith("out of sync"):
                    st.versions[i] = -1  # it gets the full state next time
                rec.update(status="failed", reason=reason)
                log.warning("round %d: client %d left out: %s", t, i, reason)
                continue
            m = reply.content["metrics"]
            rec.update(train_loss=m["train_loss"], train_seconds=m["train_seconds"],
                       encode_seconds=m["encode_seconds"], num_samples=int(m["num_samples"]))  # fmt: skip
            rec.update(client_diagnostics(m))
            [data] = unpack(reply.content["up"])
            rec["upload_bytes"], rec["upload_bound_bytes"] = len(data), float(m["upload_bound_bytes"])
            got, seconds = self._accept_upload(t, rec, data)
            server_s += seconds
            if got is None:
                continue
            uploads.append(got)
            weights.append(int(m["num_samples"]))
            accepted.append(i)

        broadcast_bytes, diagnostics = 0, {}
        if uploads:
            enc, _, seconds, diagnostics = self._aggregate(t, uploads, weights)
            server_s += seconds
            broadcast_bytes = len(enc.data)
            synced = self._send_broadcast(t, enc.data, [r for r in records if r["client"] in accepted])
            for rec in records:
                if rec["client"] in synced:
                    rec["download_bytes"] += len(enc.data)
                    rec["download_bound_bytes"] += enc.bound_bytes
                    st.versions[rec["client"]] = t
        else:
            log.warning("round %d: no upload accepted; the global state is unchanged", t)
        self._prune_history()
        return self._finish_round(t, clients, records, accepted, broadcast_bytes, server_s, wall0, diagnostics,
                                  runtime="flower")

    def _collect(self, ids: list[str]) -> dict[str, Message]:
        """Replies to the messages `ids`, as many as come within the round timeout."""
        got: dict[str, Message] = {}
        deadline = time.monotonic() + self.round_timeout
        while len(got) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([i for i in ids if i not in got]):
                got[reply.metadata.reply_to_message_id] = reply
            if len(got) < len(ids):
                time.sleep(0.1)
        return got

    def _send_broadcast(self, t: int, data: bytes, records: list[dict[str, Any]]) -> set[int]:
        """Send round t's broadcast to the accepted clients; returns those that applied it."""
        down = pack([data])
        ids = {}
        for rec in records:
            content = RecordDict({"config": self._config(round=t, client=rec["client"]), "down": down})
            [mid] = self.grid.push_messages([Message(content, dst_node_id=rec["node_id"], message_type="train.apply")])
            ids[mid] = rec["client"]
        replies = self._collect(list(ids))
        synced = set()
        for mid, client in ids.items():
            reply = replies.get(mid)
            if reply is not None and not reply.has_error() and "error" not in reply.content["result"]:
                synced.add(client)
                continue
            why = "no reply" if reply is None else (reply.error.reason if reply.has_error() else reply.content["result"]["error"])
            log.warning("round %d: client %d did not apply the broadcast (%s); %s", t, client, why,
                        self._node_lost(t, client, "the broadcast was not acknowledged"))  # fmt: skip
        return synced


def resolve(opts: FlowerRunOptions) -> tuple[RunConfig, str, Path]:
    """The run config, the algorithm and the run directory a Flower run config names."""
    cfg, _ = load_run_config(opts.config, opts.overrides())
    algorithm = opts.algorithm or cfg.algorithms[0]
    if algorithm not in cfg.algorithms:
        raise ConfigError(f"algorithm: {algorithm!r} is not one of the config's algorithms {list(cfg.algorithms)}")
    cfg = dataclasses.replace(cfg, algorithms=(algorithm,))
    out = Path(opts.out_dir) if opts.out_dir else Path("runs") / f"{cfg.name}-flower-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, algorithm, out.resolve()


def run_on_grid(grid: Grid, opts: FlowerRunOptions) -> dict[str, Any]:
    """One algorithm's run on the nodes of `grid`, into a run directory; returns its summary."""
    cfg, algorithm, out = resolve(opts)
    rd = RunDir(out)
    if rd.metrics.exists():
        raise FileExistsError(f"{out} already holds a run; resuming is not supported on the Flower runtime yet")
    rd.create()
    text = dump_toml(cfg.to_mapping())
    atomic_write(rd.config, text)
    meta = {"algorithm": algorithm, "config": text}

    task = make_task(cfg.task_name, cfg.task, cfg.seed)

    def on_round(record: dict[str, Any], state: SimState) -> None:
        record_round(rd, meta, task, record, state)
        acc = f", accuracy {record['eval']['accuracy']:.4f}" if "eval" in record else ""
        logging.getLogger("fedlowrank.flower").info(
            "round %d: %d of %d clients accepted, %d bytes up, %d bytes down%s", record["round"], record["accepted"],
            len(record["clients"]), record["upload_bytes"], record["download_bytes"], acc)  # fmt: skip

    handler = rd.log_handler()
    log.addHandler(handler)
    try:
        sim = FlowerSimulation(task, cfg.make_algorithm(algorithm), cfg.sim, cfg.seed, grid, text, algorithm,
                               opts.round_timeout, opts.nodes_timeout, on_round=on_round)  # fmt: skip
        sim.run()
    finally:
        log.removeHandler(handler)
        handler.close()
    summary = finish_run(rd, cfg, algorithm, task, sim.state, runtime_note=" (Flower)")
    if opts.log_level in ("DEBUG", "INFO"):
        print(f"fedlowrank: run directory {out}", flush=True)
    return summary


def make_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is `defaults` updated with Flower's run config (tests pass
    `defaults`, since Flower's `run_simulation` takes no run config)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        opts = FlowerRunOptions.from_run_config({**(defaults or {}), **context.run_config})
        logging.getLogger("fedlowrank").setLevel(getattr(logging, opts.log_level))
        run_on_grid(grid, opts)

    return server


app = make_server_app()
