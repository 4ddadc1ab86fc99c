"""Errors the CLI maps to exit codes without importing the heavy modules that raise them."""

from __future__ import annotations

__all__ = ["TrainingFailed"]


class TrainingFailed(RuntimeError):
    """A run ended without one accepted client update: nothing trained (the CLI exits 1)."""
