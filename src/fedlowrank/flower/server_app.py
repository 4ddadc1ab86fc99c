"""The Flower ServerApp: the one round protocol (`fedlowrank.protocol.server`) and the one run
orchestration (`fedlowrank.runs.experiment.run_experiment`), with clients on SuperNodes reached
through `fedlowrank.flower.transport.FlowerTransport`.

One ServerApp run executes every algorithm of the run config (or the one `algorithm` names)
into one run directory, the same tree as the in-process runtime: `config.toml`, one folder per
algorithm (metrics.jsonl, checkpoint.pt, events.log, summaries, adapter/ where the task has
one) and the comparison. With `resume = true` it continues from the run directory's
checkpoints: finished algorithms are skipped, the others go on after their last complete round.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlowrank.config import ConfigError
from fedlowrank.flower.common import FINISHED, FlowerRunOptions
from fedlowrank.flower.local_superlink import process_alive
from fedlowrank.flower.transport import FlowerTransport, NodeDirectory
from fedlowrank.runconfig import RunConfig, dump_toml, load_run_config
from fedlowrank.runs.experiment import run_experiment

__all__ = ["app", "run_on_grid", "resolve"]

log = logging.getLogger("fedlowrank.flower")


def resolve(opts: FlowerRunOptions) -> tuple[RunConfig, Path]:
    """The run config (restricted to `algorithm` when one is named) and the run directory."""
    cfg, _ = load_run_config(opts.config, opts.overrides())
    if opts.algorithm:
        if opts.algorithm not in cfg.algorithms:
            raise ConfigError(f"algorithm: {opts.algorithm!r} is not one of the config's algorithms {list(cfg.algorithms)}")
        cfg = dataclasses.replace(cfg, algorithms=(opts.algorithm,))
    out = Path(opts.out_dir) if opts.out_dir else Path("runs") / f"{cfg.name}-flower-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, out.resolve()


class DriverGone(RuntimeError):
    """The process named by the `watch-pid` run config key is gone: the run stops."""


class _LogProgress:
    """One log line per round (the `log-level` run config key silences it). With `watch_pid`,
    the run stops (DriverGone) after the first round that ends with that process gone: a
    simulation whose `fedlowrank run` was killed must not go on writing its run directory (the
    round is checkpointed before; `--resume` continues from it)."""

    def __init__(self, watch_pid: int = 0) -> None:
        self.watch_pid = watch_pid

    def _check(self) -> None:
        if self.watch_pid and not process_alive(self.watch_pid):
            raise DriverGone(f"process {self.watch_pid}, which started this run, is gone: stopping")

    def start(self, algorithm: str, rounds: int, done: int) -> None:
        self._check()
        log.info("%s: rounds %d to %d", algorithm, done + 1, rounds)

    def advance(self, algorithm: str, record: dict[str, Any]) -> None:
        acc = f", accuracy {record['eval']['accuracy']:.4f}" if "eval" in record else ""
        log.info("%s round %d: %d of %d clients accepted, %d bytes up, %d bytes down%s", algorithm, record["round"],
                 record["accepted"], len(record["clients"]), record["upload_bytes"], record["download_bytes"], acc)  # fmt: skip
        self._check()

    def finish(self, algorithm: str, summary: dict[str, Any]) -> None:
        log.info("%s: done", algorithm)


def run_on_grid(grid: Grid, opts: FlowerRunOptions) -> list[dict[str, Any]]:
    """The run config's algorithms on the nodes of `grid`, into a run directory; their summaries."""
    cfg, out = resolve(opts)
    text = dump_toml(cfg.to_mapping())  # what the ClientApps build their side from
    directories: dict[int, NodeDirectory] = {}  # one per client count (one task: one entry)

    def transport(algorithm: str):
        def build(server):
            n = server.task.num_clients
            directory = directories.setdefault(n, NodeDirectory(grid, n))
            return FlowerTransport(server, directory, text, algorithm, opts.round_timeout, opts.nodes_timeout)

        return build

    summaries = run_experiment(cfg, out, resume=opts.resume, progress=_LogProgress(opts.watch_pid),
                               transport=transport, runtime_note=" (Flower)")  # fmt: skip
    print(f"{FINISHED} {out}", flush=True)  # whatever the log level: `--runtime flower` waits for it
    return summaries


def _log_to_stdout(level: str) -> None:
    """fedlowrank's log lines at `level` and above, on stdout unless a handler already takes them
    (in the ServerApp process Flower starts, none does; Flower streams its stdout to `flwr run
    --stream`)."""
    ours = logging.getLogger("fedlowrank")
    ours.setLevel(getattr(logging, level))
    if not ours.hasHandlers():
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    opts = FlowerRunOptions.from_run_config(context.run_config)
    _log_to_stdout(opts.log_level)
    run_on_grid(grid, opts)
