"""A run directory: metrics.jsonl, checkpoint.pt, events.log, summary.json / summary.md, curves.png.

Files that must never be seen half-written (the checkpoint, summaries, the config) are written
to a temporary name in the same folder, flushed to disk and renamed over the old one. The
metrics file is append-only; on resume it is cut back to the checkpoint's round, so a run killed
between the two writes repeats that round once and keeps one line for it.

A checkpoint verifies itself: `MAGIC`, the SHA-256 of the rest, then the torch-serialized state.
The previous good one is kept as `checkpoint.prev.pt`; loading falls back to it (with a warning
naming the corrupt file) when the newest does not verify. On resume every line of metrics.jsonl
must be JSON, except a last line cut by a kill. Non-finite numbers are written as `null`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fedlowrank.errors import CorruptRun, RunBusy
from fedlowrank.files import atomic_write  # re-exported
from fedlowrank.protocol.state import SimState

__all__ = ["RunDir", "RunLock", "RunBusy", "CorruptRun", "atomic_write", "finite_json", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 2
MAGIC = b"FLRK-CHECKPOINT-2\n"
log = logging.getLogger("fedlowrank.sim")


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _dumps(record: Any) -> str:
    return json.dumps(finite_json(record), sort_keys=True, allow_nan=False)


class RunDir:
    """The files of one algorithm's run."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.previous = self.path / "checkpoint.prev.pt"
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
            f.write(_dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self, strict: bool = True) -> list[dict[str, Any]]:
        """The metrics lines. A last line cut by a kill is dropped; with `strict`, any other line
        that is not a JSON object with the next round number is a `CorruptRun` naming it."""
        if not self.metrics.exists():
            return []
        lines = [(i + 1, line.strip()) for i, line in enumerate(self.metrics.read_text(errors="replace").splitlines())]
        lines = [(n, line) for n, line in lines if line]
        out = []
        for j, (n, line) in enumerate(lines):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or rec.get("round") != len(out) + 1:
                    raise ValueError(f"expected the record of round {len(out) + 1}")
            except ValueError as e:
                if j == len(lines) - 1:
                    break  # a line cut by a kill: nothing after it counts
                if strict:
                    raise CorruptRun(f"{self.metrics}: line {n} is not a valid round record ({e}); "
                                     "the file was edited or damaged") from None  # fmt: skip
                break
            out.append(rec)
        return out

    def truncate_metrics(self, last_round: int) -> None:
        records = self.read_metrics(strict=True)
        if len(records) < last_round:
            raise CorruptRun(f"{self.metrics}: {len(records)} rounds recorded, but the checkpoint is at round "
                             f"{last_round}; the file was cut or damaged")  # fmt: skip
        atomic_write(self.metrics, "".join(_dumps(r) + "\n" for r in records[:last_round]))

    # --- events -----------------------------------------------------------------------------
    def log_handler(self) -> logging.Handler:
        h = logging.FileHandler(self.events)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return h

    # --- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, state: SimState, meta: dict[str, Any]) -> None:
        """Write the checkpoint (self-verifying); the one it replaces becomes checkpoint.prev.pt."""
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state": state.to_dict()}, buf)
        body = buf.getvalue()
        tmp = self.path / ".checkpoint.pt.new"
        atomic_write(tmp, MAGIC + hashlib.sha256(body).digest() + body)
        if self.checkpoint.exists():
            os.replace(self.checkpoint, self.previous)
        os.replace(tmp, self.checkpoint)

    def _read_checkpoint(self, path: Path) -> tuple[SimState, dict[str, Any]]:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CorruptRun(f"{path}: cannot be read: {e}") from None
        if not data.startswith(MAGIC):
            raise CorruptRun(f"{path}: not a fedlowrank checkpoint of format {CHECKPOINT_FORMAT} "
                             "(damaged, or written by an older version)")  # fmt: skip
        digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
        if hashlib.sha256(body).digest() != digest:
            raise CorruptRun(f"{path}: checksum mismatch: the file is damaged or was changed")
        try:
            blob = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
            return SimState.from_dict(blob["state"]), blob["meta"]
        except Exception as e:  # noqa: BLE001 - a verified file we still cannot read
            raise CorruptRun(f"{path}: verified but unreadable: {type(e).__name__}: {e}") from None

    def load_checkpoint(self) -> tuple[SimState, dict[str, Any]] | None:
        """The newest checkpoint that verifies (None when there is none); falls back to
        checkpoint.prev.pt, with a warning, when checkpoint.pt does not verify."""
        if not self.checkpoint.exists() and not self.previous.exists():
            return None
        errors = []
        for path in (self.checkpoint, self.previous):
            if not path.exists():
                continue
            try:
                got = self._read_checkpoint(path)
            except CorruptRun as e:
                errors.append(str(e))
                continue
            if errors:
                log.warning("%s; resuming from the previous checkpoint %s (round %d)", errors[0], path, got[0].round)
            return got
        raise CorruptRun("; ".join(errors) + ("" if self.previous.exists() else "; there is no previous checkpoint"))

    # --- summaries --------------------------------------------------------------------------
    def write_json(self, path: Path, data: Any) -> None:
        atomic_write(path, json.dumps(finite_json(data), indent=2, sort_keys=True, allow_nan=False) + "\n")

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


class RunLock:
    """An advisory lock on a run directory (`.fedlowrank.lock`, flock): one process at a time.
    The kernel drops it when the holder exits, however it exits (kill -9 included)."""

    NAME = ".fedlowrank.lock"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path) / self.NAME
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunBusy(f"{self.path.parent} is in use by another fedlowrank process (pid {holder}); "
                          "wait for it to finish or stop it first") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
