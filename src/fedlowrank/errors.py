"""Errors the CLI maps to exit codes without importing the heavy modules that raise them."""

from __future__ import annotations

__all__ = ["TrainingFailed", "CorruptRun", "RunBusy"]


class TrainingFailed(RuntimeError):
    """A run ended without one accepted client update: nothing trained (the CLI exits 1)."""


class CorruptRun(ValueError):
    """A run directory file that does not verify (checkpoint, metrics); the message names it."""


class RunBusy(RuntimeError):
    """Another process holds the run directory (its advisory lock)."""
