"""What a run leaves for use: PEFT adapters, merged models, state snapshots, completions.

For tasks with a PEFT adapter (`causal-lm`, `lm-domains`, `text-classification`, the task has
`save_adapter`):

* every evaluated round's state is kept as `states/round-NNNNN.pt` in the algorithm's run
  directory (the global state, and each client's local keys where an algorithm keeps some),
  so `fedlowrank export --round N` can write any evaluated round, finished run or not;
* when the run finishes, `adapter/` holds the final global adapter as a PEFT folder
  (`adapter_config.json` with the base model's real path, `adapter_model.safetensors`); where
  keys stay on the clients (FedPer), `adapter/clients/<client>/` holds each client's own.

Folders are written under a temporary name and renamed, so none is ever seen half-written.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedlowrank.config import did_you_mean
from fedlowrank.runs.rundir import RunDir, atomic_write, find_runs

__all__ = ["has_adapter", "save_snapshot", "snapshot_rounds", "write_adapters", "RunState", "load_run_state",
           "export_run", "ADAPTER_DIR"]  # fmt: skip

ADAPTER_DIR = "adapter"
STATES_DIR = "states"


def has_adapter(task) -> bool:
    return callable(getattr(task, "save_adapter", None))


def _snapshot_path(rd: RunDir, round: int) -> Path:
    return rd.path / STATES_DIR / f"round-{round:05d}.pt"


def save_snapshot(rd: RunDir, round: int, global_state, local) -> None:
    path = _snapshot_path(rd, round)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"round": round, "global_state": dict(global_state), "local": {int(k): dict(v) for k, v in local.items()}}, buf)
    atomic_write(path, buf.getvalue())


def snapshot_rounds(rd: RunDir) -> list[int]:
    d = rd.path / STATES_DIR
    return sorted(int(p.stem.removeprefix("round-")) for p in d.glob("round-*.pt")) if d.is_dir() else []


def _write_dir(dest: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside `dest`, then put it in `dest`'s place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _client_name(task, i: int) -> str:
    names = getattr(task, "client_names", None)
    return str(names[i]) if names is not None else str(i)


def write_adapters(task, global_state, local, dest: Path, merged: bool = False) -> None:
    """The global adapter (or merged model) at `dest`, each client's own under dest/clients/."""
    save = task.save_merged if merged else task.save_adapter

    def fill(tmp: Path) -> None:
        save(dict(global_state), tmp)
        for i, own in sorted(local.items()):
            save({**global_state, **own}, tmp / "clients" / _client_name(task, i))

    _write_dir(Path(dest), fill)


class RunState:
    """The config, task state and local keys of one algorithm's run at a round."""

    def __init__(self, rd: RunDir, cfg, algorithm: str, round: int, global_state, local) -> None:
        self.rd, self.cfg, self.algorithm, self.round = rd, cfg, algorithm, round
        self.global_state, self.local = global_state, local

    def build_task(self):
        from fedlowrank.tasks import make_task

        task = make_task(self.cfg.task_name, self.cfg.task, self.cfg.seed).build()
        if not has_adapter(task):
            raise ValueError(f"{self.rd.path}: task {self.cfg.task_name!r} has no PEFT adapter to export")
        return task


def _pick_run(run: Path, algorithm: str | None) -> RunDir:
    runs = find_runs([run])
    if algorithm:
        chosen = [r for r in runs if r.path.name == algorithm]
        if not chosen:
            names = [r.path.name for r in runs]
            raise FileNotFoundError(f"{run}: no run of algorithm {algorithm!r}{did_you_mean(algorithm, names)}; it holds {[r.path.name for r in runs]}")
        return chosen[0]
    if len(runs) > 1:
        raise FileNotFoundError(f"{run} holds runs of {[r.path.name for r in runs]}; pick one with --algorithm")
    return runs[0]


def load_run_state(run: Path | str, round: int | None = None, algorithm: str | None = None) -> RunState:
    """The state of a run (the latest complete round, or evaluated round `round`)."""
    from fedlowrank.runs.experiment import load_saved_config

    rd = _pick_run(Path(run), algorithm)
    cfg = load_saved_config(rd.path if (rd.path / "config.toml").exists() else rd.path.parent)
    name = cfg.algorithms[0] if len(cfg.algorithms) == 1 else rd.path.name
    got = rd.load_checkpoint()
    if got is None:
        raise FileNotFoundError(f"{rd.path}: no checkpoint.pt yet (not one round finished)")
    state, _ = got
    if round is None or round == state.round:
        return RunState(rd, cfg, name, state.round, state.global_state, state.local)
    if not _snapshot_path(rd, round).exists():
        kept = snapshot_rounds(rd)
        raise FileNotFoundError(f"{rd.path}: no state of round {round}; kept rounds: {kept} (every evaluated round) "
                                f"and {state.round} (the latest)")  # fmt: skip
    blob = torch.load(_snapshot_path(rd, round), map_location="cpu", weights_only=True)
    return RunState(rd, cfg, name, round, blob["global_state"], {int(k): v for k, v in blob["local"].items()})


def export_run(run: Path | str, out: Path | str, merged: bool = False, round: int | None = None,
               algorithm: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Write a run's adapter (or the merged model) to `out`; returns what was written."""
    rs = load_run_state(run, round, algorithm)
    task = rs.build_task()
    write_adapters(task, rs.global_state, rs.local, Path(out), merged=merged)
    return {"run": str(rs.rd.path), "algorithm": rs.algorithm, "round": rs.round, "out": str(out), "merged": merged,
            "clients": len(rs.local)}  # fmt: skip
