"""`fedlowrank run ... --runtime flower`: each algorithm of a run config on Flower's simulation
engine (Ray), one virtual SuperNode per client, into the same run directory layout as the
in-process runtime (`out/` for one algorithm, `out/<algorithm>/` for several)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__all__ = ["simulate"]


def simulate(config: str | None, overrides: Sequence[str], out: Path | str, cpus_per_client: float = 1.0) -> list[dict[str, Any]]:
    """Run every algorithm of `config` (a preset or a .toml path, plus `--set` overrides)."""
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
    cpus = max(1, os.cpu_count() or 1)
    summaries = []
    for algorithm in cfg.algorithms:
        rd = out / algorithm if len(cfg.algorithms) > 1 else out
        opts = {"config": config, "algorithm": algorithm, "set": ";".join(overrides), "out-dir": str(rd)}
        run_simulation(
            make_server_app(opts), client_app, num_supernodes=cfg.task.num_clients,
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                            "init_args": {"num_cpus": cpus, "num_gpus": 0}},
        )  # fmt: skip
        summary_path = rd / "summary.json"
        if not summary_path.exists():
            raise RuntimeError(f"the Flower run of {algorithm} did not finish; see the log above and {rd / 'events.log'}")
        summaries.append(json.loads(summary_path.read_text()))
    return summaries
