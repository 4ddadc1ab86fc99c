"""`fedlowrank run ... --runtime flower`: each algorithm of a run config on Flower's simulation
engine (Ray), one virtual SuperNode per client, into the same run directory layout as the
in-process runtime (`out/` for one algorithm, `out/<algorithm>/` for several)."""

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
             verbose: bool = False, quiet: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Run every algorithm of `config` (a preset or a .toml path, plus `--set` overrides).
    Without `verbose`, Flower's debug lines and its deprecation notice are filtered out; with
    `quiet`, the ServerApp's per-round lines too."""
    import json

    from flwr.simulation import run_simulation

    from fedlowrank.config import ConfigError
    from fedlowrank.flower.client_app import app as client_app
    from fedlowrank.flower.server_app import make_server_app
    from fedlowrank.runconfig import DEFAULT_PRESET, load_run_config

    config = config or DEFAULT_PRESET
    for item in overrides:
        if ";" in item:
            raise ConfigError(f"--set {item!r}: ';' cannot be used with --runtime flower")
    cfg, _ = load_run_config(config, overrides)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; the Flower runtime writes a new run directory")
    from fedlowrank.runconfig import dump_toml
    from fedlowrank.sim.experiment import write_comparison
    from fedlowrank.sim.rundir import RunDir, atomic_write
    from fedlowrank.tasks import make_task

    # one SuperNode per client: the task says how many (lm-domains, shakespeare and causal-lm
    # count their clients from their data, not from a num_clients field)
    clients = make_task(cfg.task_name, cfg.task, cfg.seed).build().num_clients
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.toml", dump_toml(cfg.to_mapping()))
    # Flower logs to the "flwr" logger and its handlers; the filter sits on both for this call only
    flwr_log = logging.getLogger("flwr")
    filtered = [] if verbose else [flwr_log, *flwr_log.handlers]
    noise = _FlowerNoise()
    for f in filtered:
        f.addFilter(noise)
    cpus = max(1, os.cpu_count() or 1)
    summaries, series = [], []
    try:
        for algorithm in cfg.algorithms:
            rd = out / algorithm if len(cfg.algorithms) > 1 else out
            opts = {"config": config, "algorithm": algorithm, "set": ";".join(overrides), "out-dir": str(rd),
                    "log-level": "DEBUG" if verbose else "WARNING" if quiet else "INFO"}
            run_simulation(
                make_server_app(opts), client_app, num_supernodes=clients, verbose_logging=verbose,
                backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                                # the actors' own log lines reach the terminal only with --verbose
                                # (a client's failure is in events.log either way)
                                "init_args": {"num_cpus": cpus, "num_gpus": 0, "log_to_driver": verbose}},
            )  # fmt: skip
            summary_path = rd / "summary.json"
            if not summary_path.exists():
                raise RuntimeError(f"the Flower run of {algorithm} did not finish; see the log above and {rd / 'events.log'}")
            summaries.append(json.loads(summary_path.read_text()))
            series.append((algorithm, RunDir(rd).read_metrics()))
    finally:
        for f in filtered:
            f.removeFilter(noise)
    if len(cfg.algorithms) > 1:
        write_comparison(out, cfg, summaries, series)
    return summaries
