"""The README's Python blocks run as written and show what the README says they show."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_library_blocks_run_and_learn(capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2
    spaces = []
    for code in blocks:
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
        spaces.append(ns)
    out = capsys.readouterr().out
    final = spaces[0]["final"]
    assert final["fedavg"] > 0.5 and final["fedsrd-plus"] > 0.25  # both learn (chance is 0.1)
    for name, acc in final.items():  # the printed numbers are the ones the README quotes
        assert f"{name:12} accuracy {acc:.3f}" in README.read_text(), (name, acc)
    assert "bytes up;" in out
    new = spaces[1]["new_state"]
    assert set(new) == {"layer.lora_A.weight", "layer.lora_B.weight"} and float(new["layer.lora_B.weight"].norm()) > 0


def test_the_docs_stand_alone():
    """A reader with only this repository cannot open the design notes it was built from."""
    root = README.parent
    files = [README, root / "Makefile", *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py"),
             *(root / "benchmarks").glob("*.py")]  # fmt: skip
    for f in files:
        text = f.read_text()
        for ref in ("DESIGN.md", "reference/", "../shared"):
            assert ref not in text, f"{f.relative_to(root)} cites {ref}, which is not in the repository"
