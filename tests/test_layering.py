"""Layers only import downward: algorithms and tasks know nothing of runtimes, the round
protocol knows no runtime, and the in-process runtime (`sim/`) knows nothing of Flower."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedlowrank"

# package -> packages of fedlowrank it must never import (directly or inside a function)
FORBIDDEN = {
    "algorithms": {"tasks", "protocol", "sim", "runs", "flower", "cli"},
    "tasks": {"algorithms", "protocol", "sim", "runs", "flower", "cli"},
    "data": {"algorithms", "tasks", "protocol", "sim", "runs", "flower", "cli"},
    "models": {"algorithms", "tasks", "protocol", "sim", "runs", "flower", "cli"},
    "fedpara": {"protocol", "sim", "runs", "flower", "cli"},
    "protocol": {"sim", "runs", "flower", "cli"},
    "runs": {"sim", "flower", "cli"},
    "sim": {"runs", "flower", "cli"},
}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlowrank."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fedlowrank.")}
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_layers(package):
    bad = {f"{p.relative_to(SRC)} imports fedlowrank.{m}" for p in (SRC / package).rglob("*.py")
           for m in imports(p) & FORBIDDEN[package]}  # fmt: skip
    assert not bad, sorted(bad)
