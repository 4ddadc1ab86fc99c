"""The `fedlowrank` command and run configs: presets, overrides, errors by field, run directory, report."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from fedlowrank.cli import main
from fedlowrank.config import ConfigError
from fedlowrank.runconfig import DEFAULT_PRESET, dump_toml, list_presets, load_run_config, parse_run_config

DIGITS = ["--set", "task.name=digits", "--set", "task.num_clients=6", "--set", "sim.rounds=2"]


def digits_config(tmp_path: Path, **sim) -> Path:
    raw = {
        "name": "tiny",
        "algorithms": ["fedsrd", "fedavg"],
        "task": {"name": "digits", "num_clients": 6},
        "sim": {"rounds": 3, "eval_every": 1, **sim},
    }
    path = tmp_path / "tiny.toml"
    path.write_text(dump_toml(raw))
    return path


def test_every_preset_loads():
    presets = list_presets()
    assert DEFAULT_PRESET in presets
    for name in presets:
        cfg, _ = load_run_config(name)
        assert cfg.algorithms


def test_default_preset_is_fedsrd_against_fedavg_on_news_topics():
    cfg, _ = load_run_config(None)
    assert cfg.task_name == "news-topics"
    assert list(cfg.algorithms) == ["fedsrd", "fedsrd-plus", "fedavg"]
    plus, paper = cfg.make_algorithm("fedsrd-plus").config, cfg.make_algorithm("fedsrd").config
    assert plus.rebalance and plus.solve == "tikhonov" and plus.upload_mask == "importance-sampled"
    assert not paper.rebalance and paper.solve == "pinv" and paper.upload_mask == "importance"  # the paper's method
    assert (plus.upload_sparsity, plus.download_drop) == (paper.upload_sparsity, paper.download_drop)  # same budget


def test_fedsrd_tables_preset_removes_one_component_per_ablation_row():
    """Table 4 is cumulative: each row keeps the previous row's removals and drops one more."""
    from fedlowrank.algorithms.fedavg import FedAvg
    from fedlowrank.algorithms.fedsrd import FedSRD
    from fedlowrank.algorithms.flexlora import FlexLoRA

    cfg, _ = load_run_config("lm-domains-fedsrd-tables")
    assert cfg.task_name == "lm-domains" and cfg.task.model == "smollm2"
    rows = [cfg.make_algorithm(a) for a in
            ("fedsrd", "fedsrd-fixed-ratio", "fedsrd-random-upload", "flexlora-random-upload", "fedavg-random-upload")]  # fmt: skip
    full, fixed, rand, flex, avg = rows
    assert type(full) is FedSRD and full.config.adaptive and full.config.upload_mask == "importance"
    assert type(fixed) is FedSRD and not fixed.config.adaptive and fixed.config.upload_mask == "importance"
    assert type(rand) is FedSRD and not rand.config.adaptive and rand.config.upload_mask == "random"
    assert type(flex) is FlexLoRA and flex.config.upload_mask == "random"  # dense SVD download, reconstructs
    assert type(avg) is FedAvg and avg.config.upload_mask == "random"  # no reconstruction
    assert {r.config.upload_sparsity for r in rows} == {0.85}  # one base ratio throughout
    assert cfg.make_algorithm("fedsrd-rebalance").config.rebalance


def test_variant_labels_configure_a_registered_algorithm_twice():
    raw = {
        "algorithms": ["fedsrd", "srd-fixed"],
        "task": {"name": "digits"},
        "algorithm": {"srd-fixed": {"base": "fedsrd", "adaptive": False, "upload_sparsity": 0.9}},
    }
    cfg = parse_run_config(raw)
    alg = cfg.make_algorithm("srd-fixed")
    assert alg.name == "fedsrd" and alg.config.adaptive is False and alg.config.upload_sparsity == 0.9
    assert cfg.make_algorithm("fedsrd").config.adaptive is True
    again = parse_run_config(tomllib.loads(dump_toml(cfg.to_mapping())))  # resolved config round-trips
    assert again.algorithm_options == cfg.algorithm_options
    with pytest.raises(ConfigError, match=r"algorithm\.srd-fixed\.base: unknown algorithm 'fedsdr'"):
        parse_run_config({**raw, "algorithm": {"srd-fixed": {"base": "fedsdr"}}})
    with pytest.raises(ConfigError, match="algorithms: unknown algorithm 'srd-fixed'"):
        parse_run_config({**raw, "algorithm": {}})
    with pytest.raises(ConfigError, match="algorithm.fedsrd.adaptiv: unknown field"):
        parse_run_config({**raw, "algorithm": {"srd-fixed": {"base": "fedsrd", "adaptiv": False}}})


def test_resolved_config_round_trips_through_toml():
    cfg, _ = load_run_config(None, ["algorithm.fedsrd.upload_sparsity=0.9", "sim.rounds=3", "seed=7"])
    text = dump_toml(cfg.to_mapping())
    again = parse_run_config(tomllib.loads(text))
    assert again == cfg
    assert again.algorithm_options["fedsrd"]["upload_sparsity"] == 0.9
    assert again.algorithm_options["fedavg"]["upload_mask"] == "none"  # defaults filled in


@pytest.mark.parametrize(
    "override, message",
    [
        (["sim.roundz=3"], "sim.roundz: unknown field (did you mean 'rounds'?)"),
        (["sim.rounds=0"], "sim.rounds: must lie in [1, 1000000], got 0"),
        (["sim.rounds=three"], "sim.rounds: expected an integer, got str 'three'"),
        (["sim.upload_dtype=int8"], "sim.upload_dtype: got 'int8', allowed: 'fp32', 'bf16', 'fp16'"),
        (["algorithm.fedsrd.upload_sparsity=1.5"], "algorithm.fedsrd.upload_sparsity: must lie in [0, 1), got 1.5"),
        (["algorithm.fedsrd.upload_sparsty=0.5"], "algorithm.fedsrd.upload_sparsty: unknown field (did you mean 'upload_sparsity'?)"),
        (["algorithm.fedsrdd.download_drop=0.5"], "algorithm.fedsrdd: unknown algorithm"),
        (["algorithms=fedsrd,fedavgg"], "algorithms: unknown algorithm 'fedavgg'"),
        (["task.alpha=-1"], "task.alpha: must lie in (0, 1e6], got -1"),
        (["task.lora_layers=7"], "task.lora_layers: must lie in [1, 6], got 7"),
        (["task.name=nope"], "task.name: unknown task 'nope'"),
        (["task.partition=shards"], "task.partition: got 'shards', allowed: 'dirichlet', 'labels', 'iid'"),
        (["seeed=1"], "seeed: unknown field (did you mean 'seed'?)"),
        (["sim"], "expected key=value"),
    ],
)
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, override)
    assert message in str(e.value)


def test_cli_config_error_stops_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", "--set", "algorithm.fedsrd.upload_sparsity=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config error: algorithm.fedsrd.upload_sparsity: must lie in [0, 1)" in err
    assert not out.exists()
    assert main(["run", "no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2


def test_list_shows_presets_algorithms_and_tasks(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (DEFAULT_PRESET, "fedsrd-e", "ffa-lora", "flexlora", "fed-dare", "news-topics", "digits", "fashion"):
        assert word in out


def test_run_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(digits_config(tmp_path)), "--out", str(out), "--set", "task.lr=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "fedsrd" in printed and "fedavg" in printed and "MB total" in printed
    for f in ("config.toml", "summary.json", "summary.md", "curves.png"):
        assert (out / f).exists(), f
    for alg in ("fedsrd", "fedavg"):
        for f in ("metrics.jsonl", "config.toml", "summary.json", "summary.md", "curves.png", "checkpoint.pt"):
            assert (out / alg / f).exists(), (alg, f)
        lines = [json.loads(x) for x in (out / alg / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in lines] == [1, 2, 3]
        for r in lines:
            for key in ("round", "clients", "upload_bytes", "download_bytes", "upload_bound_bytes", "server_seconds", "eval"):
                assert key in r
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["task"]["lr"] == 0.05 and saved["sim"]["rounds"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [s["algorithm"] for s in summary["runs"]] == ["fedsrd", "fedavg"]
    assert all(s["upload_mb"] > 0 and s["download_mb"] > 0 for s in summary["runs"])
    assert "| fedsrd |" in (out / "summary.md").read_text()


def test_run_refuses_an_existing_directory_and_bad_resume_flags(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = str(digits_config(tmp_path))
    assert main(["run", cfg, "--out", str(out), "--quiet"]) == 0
    assert main(["run", cfg, "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", cfg, "--resume", str(out)]) == 2
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # finished: nothing to do


def test_report_compares_runs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = str(digits_config(tmp_path))
    assert main(["run", cfg, "--out", str(a), "--quiet"]) == 0
    assert main(["run", cfg, "--out", str(b), "--quiet", "--set", "seed=1"]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--markdown", "--out", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| algorithm | runs | accuracy %")
    assert "| fedsrd | 2 |" in table and "±" in table
    for f in ("summary.md", "summary.json", "curves.png"):
        assert (tmp_path / "rep" / f).exists()
    assert main(["report", str(a / "fedavg")]) == 0
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_demo_subcommand_calls_the_demo(monkeypatch):
    import fedlowrank.demo

    called = []
    monkeypatch.setattr(fedlowrank.demo, "main", lambda: called.append(1) or 0)
    assert main(["demo"]) == 0 and called == [1]


def test_default_preset_runs_end_to_end_shortened(tmp_path, monkeypatch, capsys):
    """`fedlowrank run` with no preset (what `make run` does), cut down to seconds."""
    monkeypatch.setenv("FEDLOWRANK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "default"
    short = ["task.max_articles=150", "task.max_length=16", "task.num_clients=3", "task.local_steps=2",
             "sim.rounds=2", "sim.clients_per_round=2"]  # fmt: skip
    assert main(["run", "--out", str(out)] + [a for s in short for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "news-topics-fedsrd-vs-fedavg" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [s["algorithm"] for s in summary["runs"]] == ["fedsrd", "fedsrd-plus", "fedavg"]
    assert all(0 <= s["accuracy"] <= 1 for s in summary["runs"])


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import fedlowrank.runs.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    out = tmp_path / "r"
    assert main(["run", str(digits_config(tmp_path)), "--out", str(out), "--quiet"]) == 130
    assert f"fedlowrank run --resume {out}" in capsys.readouterr().err


def test_a_round_without_an_accepted_upload_is_reported_loudly(tmp_path, monkeypatch, capsys):
    from fedlowrank.protocol.transport import Channel

    real = Channel.upload
    monkeypatch.setattr(Channel, "upload", lambda self, r, c, data: b"garbage" if r == 2 else real(self, r, c, data))
    assert main(["run", str(digits_config(tmp_path)), "--out", str(tmp_path / "run")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "warning: fedsrd round 2: no upload accepted, the global state is unchanged: upload rejected" in out
    assert "round 1: no upload" not in out
