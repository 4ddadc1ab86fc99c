"""A run directory: metrics.jsonl, checkpoint.pt, events.log, summary.json / summary.md, curves.png.

Files that must never be seen half-written (the checkpoint, summaries, the config) are written
to a temporary name in the same folder, flushed to disk and renamed over the old one. The
metrics file is append-only; on resume it is cut back to the checkpoint's round, so a run killed
between the two writes repeats that round once and keeps one line for it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fedlowrank.files import atomic_write  # re-exported
from fedlowrank.protocol.state import SimState

__all__ = ["RunDir", "atomic_write", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


class RunDir:
    """The files of one algorithm's run."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.summary_json = self.path / "summary.json"
        self.summary_md = self.path / "summary.md"
        self.curves = self.path / "curves.png"
        self.events = self.path / "events.log"
        self.config = self.path / "config.toml"

    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # --- metrics ----------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: nothing after it counts
        return out

    def truncate_metrics(self, last_round: int) -> None:
        keep = [r for r in self.read_metrics() if r["round"] <= last_round]
        atomic_write(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    # --- events -----------------------------------------------------------------------------
    def log_handler(self) -> logging.Handler:
        h = logging.FileHandler(self.events)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return h

    # --- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, state: SimState, meta: dict[str, Any]) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state": state.to_dict()}, buf)
        atomic_write(self.checkpoint, buf.getvalue())

    def load_checkpoint(self) -> tuple[SimState, dict[str, Any]] | None:
        if not self.checkpoint.exists():
            return None
        blob = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint}: checkpoint format {blob.get('format')}, expected {CHECKPOINT_FORMAT}")
        return SimState.from_dict(blob["state"]), blob["meta"]

    # --- summaries --------------------------------------------------------------------------
    def write_json(self, path: Path, data: Any) -> None:
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def is_complete(self) -> bool:
        return self.summary_json.exists()


def _algorithm_order(config: Path) -> list[str]:
    """The `algorithms` list of a comparison's config.toml (its runs are shown in that order)."""
    import tomllib

    try:
        algorithms = tomllib.loads(config.read_text()).get("algorithms", [])
    except (OSError, tomllib.TOMLDecodeError):
        return []
    return [a for a in algorithms if isinstance(a, str)]


def find_runs(paths: Iterable[Path | str]) -> list[RunDir]:
    """Algorithm run directories under `paths`: each path is a run or a comparison of runs."""
    out: list[RunDir] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").exists():
            out.append(RunDir(p))
            continue
        subs = sorted(q for q in p.iterdir() if (q / "metrics.jsonl").exists()) if p.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{p}: no run here (no metrics.jsonl in it or in its subfolders)")
        order = _algorithm_order(p / "config.toml")
        subs.sort(key=lambda q: (order.index(q.name) if q.name in order else len(order), q.name))
        out.extend(RunDir(q) for q in subs)
    return out
