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
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlowrank.config import ConfigError
from fedlowrank.flower.common import FlowerRunOptions
from fedlowrank.flower.transport import FlowerTransport, NodeDirectory
from fedlowrank.runconfig import RunConfig, dump_toml, load_run_config
from fedlowrank.runs.experiment import run_experiment

__all__ = ["app", "make_server_app", "run_on_grid", "resolve"]

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


class _LogProgress:
    """One log line per round (the `log-level` run config key silences it)."""

    def start(self, algorithm: str, rounds: int, done: int) -> None:
        log.info("%s: rounds %d to %d", algorithm, done + 1, rounds)

    def advance(self, algorithm: str, record: dict[str, Any]) -> None:
        acc = f", accuracy {record['eval']['accuracy']:.4f}" if "eval" in record else ""
        log.info("%s round %d: %d of %d clients accepted, %d bytes up, %d bytes down%s", algorithm, record["round"],
                 record["accepted"], len(record["clients"]), record["upload_bytes"], record["download_bytes"], acc)  # fmt: skip

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

    summaries = run_experiment(cfg, out, resume=opts.resume, progress=_LogProgress(), transport=transport,
                               runtime_note=" (Flower)")  # fmt: skip
    if opts.log_level in ("DEBUG", "INFO"):
        print(f"fedlowrank: run directory {out}", flush=True)
    return summaries


def make_server_app(defaults: dict[str, Any] | None = None, errors: list[BaseException] | None = None) -> ServerApp:
    """A ServerApp whose run config is `defaults` updated with Flower's run config (the CLI and
    tests pass `defaults`, since Flower's `run_simulation` takes no run config). An exception
    that ends the run is appended to `errors` too (the simulation engine only logs it)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            opts = FlowerRunOptions.from_run_config({**(defaults or {}), **context.run_config})
            logging.getLogger("fedlowrank").setLevel(getattr(logging, opts.log_level))
            run_on_grid(grid, opts)
        except BaseException as e:
            if errors is not None:
                errors.append(e)
            raise

    return server


app = make_server_app()
