"""`fedlowrank run ... --runtime flower`: every algorithm of a run config in one start of
Flower's simulation engine (Ray), one virtual SuperNode per client, into the same run directory
layout as the in-process runtime (`out/` for one algorithm, `out/<algorithm>/` for several, with
the comparison on top). `--resume` continues such a run from its checkpoints.

The engine is started the way Flower supports: a private simulation SuperLink
(`fedlowrank.flower.local_superlink`) and one `flwr run` of our Flower App on it. The ServerApp
is the one a real deployment runs (`fedlowrank.flower.server_app.app`), with the run config
passed as Flower run config keys."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["simulate"]

# the lines of `flwr run --stream` that reach the terminal without --verbose: the ServerApp's own
# (fedlowrank's loggers and prints) and errors with their tracebacks, not Flower's start-up and
# shut-down chatter (every line is kept for the message of a failed run)
_OURS = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) fedlowrank\b|^fedlowrank: |ERROR|Traceback|^\s+File |^\w*Error\b")


def _checked(config: str | None, overrides: Sequence[str], out: Path, resume: bool) -> tuple[str, Any, int]:
    """(the config as the ServerApp should name it, the run config, the number of clients);
    every error a config, a run directory or a task can have is raised here, before any run."""
    from fedlowrank.config import ConfigError
    from fedlowrank.runconfig import DEFAULT_PRESET, load_run_config
    from fedlowrank.runs.rundir import RunLock
    from fedlowrank.tasks import make_task

    if resume:
        if config or overrides:
            raise ConfigError("resume takes the config saved in the run directory; give no config or --set")
        if not (out / "config.toml").is_file():
            raise FileNotFoundError(f"{out}: no config.toml; is this a run directory?")
        config = str(out / "config.toml")
    else:
        config = config or DEFAULT_PRESET
        if out.exists() and any(p.name != RunLock.NAME for p in out.iterdir()):
            raise FileExistsError(f"{out} already holds files; pass --resume to continue a run there")
        if Path(config).suffix == ".toml" and Path(config).is_file():
            config = str(Path(config).resolve())  # the ServerApp runs in another folder
    for item in overrides:
        if ";" in item:
            raise ConfigError(f"--set {item!r}: ';' cannot be used with --runtime flower")
    cfg, _ = load_run_config(config, overrides)
    # one SuperNode per client: the task says how many (lm-domains, shakespeare and causal-lm
    # count their clients from their data, not from a num_clients field)
    return config, cfg, make_task(cfg.task_name, cfg.task, cfg.seed).build().num_clients


def simulate(config: str | None, overrides: Sequence[str], out: Path | str, cpus_per_client: int = 1,
             verbose: bool = False, quiet: bool = False, resume: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Run every algorithm of `config` (a preset or a .toml path, plus `--set` overrides) in one
    start of Flower's simulation engine. With `resume`, continue the run in `out` (its saved
    config.toml; `config` and `overrides` must be empty). Without `verbose`, only the ServerApp's
    own lines (one per round) and errors reach stderr; with `quiet`, errors only."""
    from fedlowrank.flower.local_superlink import LocalSuperLink
    from fedlowrank.flower.reaper import start_reaper
    from fedlowrank.flower.common import FINISHED
    from fedlowrank.runs.rundir import RunDir

    out = Path(out).resolve()

    def echo(line: str) -> None:
        if verbose or (_OURS.search(line) and not line.startswith(FINISHED)):  # the CLI says where the run is
            print(line, file=sys.stderr, flush=True)

    start_reaper()  # Flower's and Ray's processes die with this one, even after kill -9
    with LocalSuperLink() as link:  # it starts while the config and the task are checked
        config, cfg, clients = _checked(config, overrides, out, resume)
        run_config = {"config": config, "set": ";".join(overrides), "out-dir": str(out), "resume": resume,
                      "log-level": "DEBUG" if verbose else "WARNING" if quiet else "INFO",
                      "watch-pid": os.getpid()}  # killed, this process stops the run within a round  # fmt: skip
        federation = {"num-supernodes": clients, "client-resources-num-cpus": cpus_per_client,
                      "client-resources-num-gpus": 0.0, "init-args-num-cpus": max(1, os.cpu_count() or 1),
                      "init-args-num-gpus": 0, "verbose": verbose,
                      # the actors' own log lines reach the terminal only with --verbose (a client's
                      # failure is in events.log either way)
                      "init-args-log-to-driver": verbose}  # fmt: skip
        # done once the ServerApp says so: Flower's own shut-down of Ray (2-4 s) is cut short
        lines = link.submit(run_config, federation, echo, done=lambda line: line.startswith(FINISHED))
    many = len(cfg.algorithms) > 1
    summaries = []
    for algorithm in cfg.algorithms:
        rd = RunDir(out / algorithm if many else out)
        if not rd.summary_json.exists():
            tail = "\n".join(lines[-40:])
            raise RuntimeError(f"the Flower run of {algorithm} did not finish; Flower's last lines:\n{tail}\n"
                               f"see {rd.events}; continue with: fedlowrank run --resume {out} --runtime flower")  # fmt: skip
        summaries.append(json.loads(rd.summary_json.read_text()))
    return summaries
