"""`fedlowrank run ... --runtime flower`: every algorithm of a run config in one start of
Flower's simulation engine (Ray), one virtual SuperNode per client, into the same run directory
layout as the in-process runtime (`out/` for one algorithm, `out/<algorithm>/` for several, with
the comparison on top). `--resume` continues such a run from its checkpoints."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here: keep Ray's notice about them quiet

__all__ = ["simulate"]


class _FlowerNoise(logging.Filter):
    """Drops Flower's DEBUG lines and its `run_simulation` deprecation notice (we know)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return False
        return "run_simulation` function is deprecated" not in record.getMessage()


def simulate(config: str | None, overrides: Sequence[str], out: Path | str, cpus_per_client: float = 1.0,
             verbose: bool = False, quiet: bool = False, resume: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Run every algorithm of `config` (a preset or a .toml path, plus `--set` overrides) in one
    start of Flower's simulation engine. With `resume`, continue the run in `out` (its saved
    config.toml; `config` and `overrides` must be empty). Without `verbose`, Flower's debug lines
    and its deprecation notice are filtered out; with `quiet`, the ServerApp's per-round lines too."""
    import json

    from flwr.simulation import run_simulation

    from fedlowrank.config import ConfigError
    from fedlowrank.flower.client_app import app as client_app
    from fedlowrank.flower.reaper import start_reaper
    from fedlowrank.flower.server_app import make_server_app
    from fedlowrank.runconfig import DEFAULT_PRESET, load_run_config
    from fedlowrank.runs.rundir import RunDir, RunLock
    from fedlowrank.tasks import make_task

    out = Path(out)
    if resume:
        if config or overrides:
            raise ConfigError("resume takes the config saved in the run directory; give no config or --set")
        if not (out / "config.toml").is_file():
            raise FileNotFoundError(f"{out}: no config.toml; is this a run directory?")
        config = str((out / "config.toml").resolve())
    else:
        config = config or DEFAULT_PRESET
        if out.exists() and any(p.name != RunLock.NAME for p in out.iterdir()):
            raise FileExistsError(f"{out} already holds files; pass --resume to continue a run there")
    for item in overrides:
        if ";" in item:
            raise ConfigError(f"--set {item!r}: ';' cannot be used with --runtime flower")
    cfg, _ = load_run_config(config, overrides)
    # one SuperNode per client: the task says how many (lm-domains, shakespeare and causal-lm
    # count their clients from their data, not from a num_clients field); a bad task fails here,
    # before anything is written or started
    clients = make_task(cfg.task_name, cfg.task, cfg.seed).build().num_clients
    # Flower logs to the "flwr" logger and its handlers; the filter sits on both for this call only
    flwr_log = logging.getLogger("flwr")
    filtered = [] if verbose else [flwr_log, *flwr_log.handlers]
    noise = _FlowerNoise()
    for f in filtered:
        f.addFilter(noise)
    cpus = max(1, os.cpu_count() or 1)
    opts = {"config": config, "set": ";".join(overrides), "out-dir": str(out), "resume": resume,
            "log-level": "DEBUG" if verbose else "WARNING" if quiet else "INFO"}  # fmt: skip
    errors: list[BaseException] = []
    start_reaper()  # Ray's processes die with this one, even after kill -9
    try:
        run_simulation(
            make_server_app(opts, errors), client_app, num_supernodes=clients, verbose_logging=verbose,
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                            # the actors' own log lines reach the terminal only with --verbose
                            # (a client's failure is in events.log either way)
                            "init_args": {"num_cpus": cpus, "num_gpus": 0, "log_to_driver": verbose}},
        )  # fmt: skip
    finally:
        for f in filtered:
            f.removeFilter(noise)
    if errors:  # the ServerApp's own failure (a config error, nothing trained, ...), as in-process
        raise errors[0]
    many = len(cfg.algorithms) > 1
    summaries = []
    for algorithm in cfg.algorithms:
        rd = RunDir(out / algorithm if many else out)
        if not rd.summary_json.exists():
            raise RuntimeError(f"the Flower run of {algorithm} did not finish; see the log above and {rd.events}; "
                               f"continue with: fedlowrank run --resume {out} --runtime flower")  # fmt: skip
        summaries.append(json.loads(rd.summary_json.read_text()))
    return summaries
