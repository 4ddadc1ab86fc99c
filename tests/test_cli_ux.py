"""What a new user meets first (issue 15): listings, `show`, did-you-mean, quiet output, report width."""

from __future__ import annotations

import dataclasses

import pytest

from fedlowrank.algorithms import ALGORITHMS, algorithm_description
from fedlowrank.cli import main
from fedlowrank.config import ConfigError, field_docs
from fedlowrank.options import describe
from fedlowrank.roundconfig import SimConfig
from fedlowrank.runconfig import dump_toml, parse_run_config
from fedlowrank.tasks import TASKS, task_class


def test_every_algorithm_and_task_has_a_description_and_documented_options():
    configs = [c.Config for c in ALGORITHMS.values()] + [task_class(n).Config for n in TASKS] + [SimConfig]
    for name, cls in ALGORITHMS.items():
        assert len(algorithm_description(cls)) > 20, name
    for name, (_, desc) in TASKS.items():
        assert len(desc) > 20, name
    for C in configs:
        docs = field_docs(C)
        missing = [f.name for f in dataclasses.fields(C) if f.init and not docs.get(f.name)]
        assert not missing, f"{C.__name__}: options without a comment: {missing}"


def test_show_prints_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    for name in ("fedsrd-e", "digits", "sim"):
        assert main(["show", name]) == 0
        out = capsys.readouterr().out
        for o in describe(name).options:
            assert o.name in out, (name, o.name)
    d = {o.name: o for o in describe("fedsrd-e").options}
    assert d["efficient"].default == "true"  # the class's own defaults, not FedSRDConfig's
    assert d["method"].type == '"auto" | "factored" | "dense" | "sketch"'
    assert main(["show", "fedsdr"]) == 2
    assert "did you mean 'fedsrd'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw,hint",
    [
        ({"algorithms": ["fedsdr"], "task": {"name": "digits"}}, "did you mean 'fedsrd'"),
        ({"algorithms": ["fedavg"], "task": {"name": "digit"}}, "did you mean 'digits'"),
        ({"algorithms": ["fedavg"], "task": {"name": "digits"}, "algorithm": {"fedavgg": {}}}, "did you mean 'fedavg'"),
        ({"algorithms": ["v"], "task": {"name": "digits"}, "algorithm": {"v": {"base": "flexlor"}}}, "did you mean 'flexlora'"),
    ],
)
def test_unknown_names_get_a_did_you_mean(raw, hint):
    with pytest.raises(ConfigError, match=hint):
        parse_run_config({"name": "x", **raw})


def tiny_run(tmp_path, capsys, *extra):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(dump_toml({"name": "tiny", "algorithms": ["fedsrd", "fedavg", "fedsrd-plus"],
                              "task": {"name": "digits", "num_clients": 4, "local_steps": 1}, "sim": {"rounds": 1}}))  # fmt: skip
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), *extra])
    return code, capsys.readouterr().out


def test_quiet_still_says_where_the_results_went(tmp_path, capsys):
    code, out = tiny_run(tmp_path, capsys, "--quiet")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"run directory: {tmp_path / 'run'}   (wall "), lines


@pytest.mark.parametrize("width", [80, 60])
def test_report_fits_the_terminal_without_cutting_numbers(tmp_path, capsys, monkeypatch, width):
    assert tiny_run(tmp_path, capsys, "--quiet")[0] == 0
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= width for line in out.splitlines()), out
    assert "…" not in out
    assert "accuracy" in out and "%" in out and "fedsrd-plus" in out
    if width == 60:
        assert "left out" in out  # the dropped columns are named
    assert main(["report", str(tmp_path / "run"), "--json"]) == 0
    import json

    runs = json.loads(capsys.readouterr().out)["runs"]
    assert {r["algorithm"] for r in runs} == {"fedsrd", "fedavg", "fedsrd-plus"}


def test_plots_have_a_title_and_one_style_per_algorithm(tmp_path):
    from fedlowrank.runs.report import algorithm_style, curves_title, plot_curves

    assert algorithm_style("fedsrd") == algorithm_style("fedsrd")
    styles = {name: tuple(sorted(algorithm_style(name).items())) for name in ALGORITHMS}
    assert len(set(styles.values())) == len(styles)  # every registered algorithm looks different
    assert algorithm_style("my-variant") == algorithm_style("my-variant")
    recs = [{"round": t, "upload_bytes": 1000, "download_bytes": 3000, "eval": {"accuracy": 0.1 * t}}
            for t in range(1, 6)]  # fmt: skip
    out = tmp_path / "c.png"
    plot_curves([("fedsrd", recs), ("fedavg", recs)], out, title=curves_title("digits", [0], 5, "tiny"))
    assert out.stat().st_size > 10_000
    assert curves_title("digits", [2, 0, 1], 20) == "digits, seeds 0, 1, 2, 20 rounds"
