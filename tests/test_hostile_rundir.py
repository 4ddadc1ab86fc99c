"""A corrupt disk or a second process against the run directory: checkpoints verify themselves
and fall back to the previous good one, metrics.jsonl is checked line by line on resume, a second
process is refused, labels cannot escape the run directory, non-finite numbers are JSON null."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from pathlib import Path

import pytest

from fedlowrank.cli import main
from fedlowrank.config import ConfigError
from fedlowrank.errors import CorruptRun, RunBusy
from fedlowrank.runconfig import parse_run_config
from fedlowrank.runs.experiment import run_experiment
from fedlowrank.runs.rundir import RunDir, RunLock, finite_json


def cfg(rounds: int = 4, algorithms=("fedavg",)):
    return parse_run_config({"name": "disk", "algorithms": list(algorithms), "seed": 0,
                             "task": {"name": "digits", "mode": "lora", "num_clients": 4},
                             "sim": {"rounds": rounds, "fraction": 0.5}})  # fmt: skip


class Kill(Exception):
    pass


def stopped_after(out: Path, round: int, rounds: int = 4) -> Path:
    """A run of `rounds` rounds killed during round `round + 1` (after `round` checkpoints)."""
    from fedlowrank.protocol.transport import Channel

    class Interrupt(Channel):
        def upload(self, r, client, data):
            if r == round + 1:
                raise Kill
            return data

    with pytest.raises(Kill):
        run_experiment(cfg(rounds=rounds), out, channel=Interrupt())
    return out


def flip(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_resumes_to_the_same_result(tmp_path, caplog):
    want = run_experiment(cfg(), tmp_path / "whole")[0]
    out = stopped_after(tmp_path / "killed", 3)
    flip(RunDir(out).checkpoint)  # round 3's checkpoint damaged: round 2's (prev) is used
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert "checksum mismatch" in caplog.text and "resuming from the previous checkpoint" in caplog.text
    got = json.loads((out / "summary.json").read_text())
    assert got["final"] == want["final"] and got["upload_bytes"] == want["upload_bytes"]
    assert [r["round"] for r in RunDir(out).read_metrics()] == [1, 2, 3, 4]


def test_both_checkpoints_damaged_is_a_clear_error_naming_them(tmp_path, capsys):
    out = stopped_after(tmp_path / "killed", 3)
    rd = RunDir(out)
    flip(rd.checkpoint)
    rd.previous.write_bytes(b"not a checkpoint")
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: checksum mismatch" in err and "checkpoint.prev.pt: not a fedlowrank checkpoint" in err


def test_a_bad_line_in_the_middle_of_metrics_is_refused_a_cut_last_line_is_not(tmp_path, capsys):
    out = stopped_after(tmp_path / "killed", 3)
    rd = RunDir(out)
    lines = rd.metrics.read_text().splitlines()
    rd.metrics.write_text("\n".join([*lines, lines[0][:25]]) + "\n")  # a kill mid-write: fine
    assert len(rd.read_metrics()) == 3
    rd.metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "line 2 is not a valid round record" in capsys.readouterr().err
    rd.metrics.write_text("\n".join(lines[:1]) + "\n")  # rounds 2 and 3 gone, checkpoint at 3
    with pytest.raises(CorruptRun, match="1 rounds recorded, but the checkpoint is at round 3"):
        run_experiment(cfg(), out, resume=True)


def _hold(path: str, ready, done) -> None:
    with RunLock(path):
        ready.set()
        done.wait(30)


def test_a_second_process_on_the_same_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path / "run"), ready, done))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunBusy, match=f"pid {p.pid}"):
            run_experiment(cfg(rounds=1), tmp_path / "run")
    finally:
        done.set()
        p.join(30)
    assert not (tmp_path / "run" / "config.toml").exists()  # the refused process wrote nothing
    run_experiment(cfg(rounds=1), tmp_path / "run")  # the holder is gone: the lock is free


@pytest.mark.parametrize("label", ["..", ".", "a/b", "x\x00y", ".hidden", "a" * 65, ""])
def test_algorithm_labels_must_be_safe_path_components(label):
    with pytest.raises(ConfigError, match="not a usable name"):
        parse_run_config({"name": "x", "algorithms": [label], "task": {"name": "digits"},
                          "algorithm": {label: {"base": "fedavg"}}})  # fmt: skip


def test_an_algorithm_the_task_cannot_run_fails_before_anything_is_written(tmp_path):
    bad = parse_run_config({"name": "x", "algorithms": ["fedavg", "fedsa-lora"], "task": {"name": "digits", "mode": "full"}})
    with pytest.raises(ConfigError, match="no LoRA B matrices"):  # the second algorithm, not the first
        run_experiment(bad, tmp_path / "run")
    assert not (tmp_path / "run" / "config.toml").exists()


def test_non_finite_numbers_are_written_as_null(tmp_path):
    rd = RunDir(tmp_path).create()
    rd.append_metrics({"round": 1, "eval": {"loss": math.inf, "accuracy": math.nan}, "x": [1.0, -math.inf]})
    line = rd.metrics.read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"round": 1, "eval": {"loss": None, "accuracy": None}, "x": [1.0, None]}
    assert finite_json({"a": (math.nan,)}) == {"a": [None]}
    assert os.path.getsize(rd.metrics) > 0
