"""Run a RunConfig: one task, each listed algorithm in turn with the same seed, a run directory.

Layout of `out/`:

    config.toml              the resolved config (every default filled in)
    <algorithm>/             one per algorithm (just `out/` itself when only one is listed)
        metrics.jsonl        one JSON object per round
        checkpoint.pt        the state after the last complete round (atomic)
        adapter/             the final global PEFT adapter (tasks with one; runs/export.py)
        states/              the state of every evaluated round (tasks with an adapter)
        events.log           clients left out and why
        summary.json, summary.md, curves.png
    summary.json, summary.md, curves.png   the comparison (when several algorithms ran)

`resume=True` continues from each algorithm's last complete round; finished algorithms are
skipped. The result equals that of an uninterrupted run (every random draw is seeded by
(seed, round, client)).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedlowrank.errors import TrainingFailed
from fedlowrank.runconfig import RunConfig, dump_toml, parse_run_config
from fedlowrank.runs.export import ADAPTER_DIR, has_adapter, save_snapshot, write_adapters
from fedlowrank.runs.report import curves_title, markdown_table, plot_curves, summarize
from fedlowrank.protocol.setup import RunSetup
from fedlowrank.runs.rundir import RunDir, RunLock, atomic_write
from fedlowrank.protocol.server import RoundServer
from fedlowrank.protocol.state import SimState
from fedlowrank.protocol.transport import Channel, InProcessTransport, Transport
from fedlowrank.tasks import make_task

__all__ = ["TrainingFailed", "record_round", "finish_run", "write_comparison", "run_experiment", "write_run_summary", "Progress", "load_saved_config", "default_out_dir"]

log = logging.getLogger("fedlowrank.sim")


TransportFor = Callable[[str], Callable[[RoundServer], Transport]]  # algorithm -> transport factory


class Progress(Protocol):
    def start(self, algorithm: str, rounds: int, done: int) -> None: ...
    def advance(self, algorithm: str, record: dict[str, Any]) -> None: ...
    def finish(self, algorithm: str, summary: dict[str, Any]) -> None: ...


def default_out_dir(cfg: RunConfig, root: Path | str = "runs") -> Path:
    return Path(root) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_saved_config(out: Path) -> RunConfig:
    import tomllib

    path = Path(out) / "config.toml"
    if not path.exists():
        raise FileNotFoundError(f"{out}: no config.toml; is this a run directory?")
    return parse_run_config(tomllib.loads(path.read_text()))


def write_run_summary(rd: RunDir, cfg: RunConfig, algorithm: str, runtime_note: str = "") -> dict[str, Any]:
    """summary.json, summary.md and curves.png of one algorithm's finished run, from its metrics."""
    records = rd.read_metrics()
    summary = summarize(records, algorithm, cfg.task_name, cfg.seed, cfg.name)
    rd.write_json(rd.summary_json, summary)
    title = f"# {cfg.name}: {algorithm} on {cfg.task_name}{runtime_note}\n\n"
    atomic_write(rd.summary_md, title + markdown_table([summary]))
    plot_curves([(algorithm, records)], rd.curves, title=curves_title(cfg.task_name, [cfg.seed], cfg.sim.rounds, cfg.name))
    return summary


def record_round(rd: RunDir, meta: dict[str, Any], task, record: dict[str, Any], state: SimState) -> None:
    """What every runtime writes after a complete round: the state snapshot of an evaluated
    round (tasks with an adapter), the metrics line, the checkpoint."""
    if "eval" in record and has_adapter(task):
        save_snapshot(rd, state.round, state.global_state, state.local)
    rd.append_metrics(record)
    rd.save_checkpoint(state, meta)


def finish_run(rd: RunDir, cfg: RunConfig, algorithm: str, task, state: SimState, runtime_note: str = "") -> dict[str, Any]:
    """What every runtime does when a run's last round is done: refuse a run in which nothing
    trained (TrainingFailed), write the final adapter (tasks with one) and the summaries."""
    records = rd.read_metrics()
    if records and not any(r["accepted"] for r in records):
        reasons = sorted({d["reason"] for r in records for d in r["dropped"]})
        raise TrainingFailed(f"{algorithm}: no client update was accepted in any of {len(records)} rounds, so "
                             f"nothing trained; reasons: {reasons[:3]} (all in {rd.events})")  # fmt: skip
    if has_adapter(task):
        write_adapters(task, state.global_state, state.local, rd.path / ADAPTER_DIR)
    return write_run_summary(rd, cfg, algorithm, runtime_note)


def _run_one(
    cfg: RunConfig,
    task,
    algorithm: str,
    rd: RunDir,
    resume: bool,
    progress: Progress | None,
    channel: Channel | None,
    transport: TransportFor | None,
    runtime_note: str,
) -> dict[str, Any]:
    alg = cfg.make_algorithm(algorithm)
    meta = {"algorithm": algorithm, "config": dump_toml(cfg.to_mapping())}
    start: SimState | None = None
    if resume:
        got = rd.load_checkpoint()
        if got is not None:
            start, saved = got
            if saved.get("algorithm") != algorithm or saved.get("config") != meta["config"]:
                raise ValueError(f"{rd.checkpoint}: checkpoint is of another config or algorithm; cannot resume")
            rd.truncate_metrics(start.round)
        else:
            rd.truncate_metrics(0)
    elif rd.metrics.exists():
        raise FileExistsError(f"{rd.path} already holds a run; pass --resume to continue it")
    rd.create()

    def on_round(record: dict[str, Any], state: SimState) -> None:
        record_round(rd, meta, task, record, state)
        if progress is not None:
            progress.advance(algorithm, record)

    handler = rd.log_handler()
    log.addHandler(handler)
    try:
        make = transport(algorithm) if transport is not None else (lambda server: InProcessTransport(server, channel))
        sim = RoundServer(task, alg, cfg.sim, cfg.seed, make, on_round=on_round)
        if progress is not None:
            progress.start(algorithm, cfg.sim.rounds, start.round if start else 0)
        sim.run(resume_from=start)
    finally:
        log.removeHandler(handler)
        handler.close()
    summary = finish_run(rd, cfg, algorithm, task, sim.state, runtime_note)
    if progress is not None:
        progress.finish(algorithm, summary)
    return summary


def run_experiment(
    cfg: RunConfig,
    out: Path | str,
    resume: bool = False,
    progress: Progress | None = None,
    channel: Channel | None = None,
    on_task_built: Callable[[float], None] | None = None,
    transport: TransportFor | None = None,
    runtime_note: str = "",
) -> list[dict[str, Any]]:
    """Run every algorithm of `cfg` into `out`; returns their summaries (config order).
    `transport(algorithm)` gives the transport factory of another runtime (Flower's ServerApp
    passes one); by default clients are in this process."""
    out = Path(out)
    if not resume and (out / "config.toml").exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it")
    t0 = time.perf_counter()
    task = make_task(cfg.task_name, cfg.task, cfg.seed).build()  # bad data or model: fail before writing
    for algorithm in cfg.algorithms:  # an algorithm the task cannot run: fail before writing too
        RunSetup.of(task, cfg.make_algorithm(algorithm), cfg.seed)
    if on_task_built is not None:
        on_task_built(time.perf_counter() - t0)
    with RunLock(out):  # one process per run directory (a second one is refused, naming the holder)
        return _run_all(cfg, task, out, resume, progress, channel, transport, runtime_note)


def _run_all(cfg, task, out: Path, resume, progress, channel, transport, runtime_note) -> list[dict[str, Any]]:
    # checked again under the lock: another process may have started a run here since the early check
    if not resume and (out / "config.toml").exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it")
    if not resume:
        atomic_write(out / "config.toml", dump_toml(cfg.to_mapping()))
    many = len(cfg.algorithms) > 1
    summaries, series = [], []
    for algorithm in cfg.algorithms:
        rd = RunDir(out / algorithm if many else out)
        if resume and rd.is_complete():
            import json

            summary = json.loads(rd.summary_json.read_text())
            if progress is not None:
                progress.finish(algorithm, summary)
        else:
            if many:
                rd.create()
                atomic_write(rd.config, dump_toml({**cfg.to_mapping(), "algorithms": [algorithm]}))
            summary = _run_one(cfg, task, algorithm, rd, resume, progress, channel, transport, runtime_note)
        summaries.append(summary)
        series.append((algorithm, rd.read_metrics()))
    if many:
        write_comparison(out, cfg, summaries, series)
    return summaries


def write_comparison(out: Path, cfg: RunConfig, summaries: list[dict[str, Any]], series) -> None:
    """The top-level summary.json, summary.md and curves.png of a run of several algorithms
    (both runtimes)."""
    top = RunDir(out)
    top.write_json(top.summary_json, {"name": cfg.name, "task": cfg.task_name, "runs": summaries})
    atomic_write(top.summary_md, f"# {cfg.name} on {cfg.task_name}\n\n" + markdown_table(summaries))
    plot_curves(series, top.curves, title=curves_title(cfg.task_name, [cfg.seed], cfg.sim.rounds, cfg.name))
