"""The in-process runtime on `digits`: every algorithm end to end, the byte ledger, catch-up of
clients that missed rounds, failures left out of a round, determinism, kill and resume."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlowrank.algorithms import ALGORITHMS, make_algorithm
from fedlowrank.runconfig import dump_toml, parse_run_config
from fedlowrank.sim import Channel, SimConfig, Simulation
from fedlowrank.runs.experiment import load_saved_config, run_experiment
from fedlowrank.runs.rundir import RunDir
from fedlowrank.tasks import make_task
from fedlowrank.tasks.digits import DigitsTask

FEDAVG_STYLE = ["fedavg", "fedprox", "fed-dare", "fedavg-magnitude", "fedavg-importance", "fedsrd"]


def digits(**kw):
    opts = {"num_clients": 8, "local_steps": 5, "lr": 0.05, "min_samples": 4}
    opts.update(kw)
    return make_task("digits", opts, seed=0)


def strip_times(x):
    """Records without wall-clock fields (everything else must repeat bit for bit)."""
    if isinstance(x, dict):
        return {k: strip_times(v) for k, v in x.items() if not k.endswith("_seconds")}
    if isinstance(x, list):
        return [strip_times(v) for v in x]
    return x


def check_ledger(records, num_clients):
    """Round totals are the sums of the clients' entries; catch-ups follow docs/runtime.md ("Catch up")."""
    version = [0] * num_clients
    broadcasts = {}  # round -> broadcast bytes
    for rec in records:
        t = rec["round"]
        per = rec["per_client"]
        assert rec["upload_bytes"] == sum(c["upload_bytes"] for c in per)
        assert rec["download_bytes"] == sum(c["download_bytes"] for c in per)
        assert rec["clients"] == [c["client"] for c in per]
        for c in per:
            i = c["client"]
            got = c["download_bytes"] - (rec["broadcast_bytes"] if c["status"] == "ok" else 0)
            missed = [b for r, b in broadcasts.items() if version[i] < r <= t - 1]
            if c["catchup"] == "none":
                assert not missed and got == 0
            elif c["catchup"] == "deltas":
                assert got == sum(missed), (t, i)
                assert got > 0
            else:
                assert c["catchup"] == "state"
                assert got < sum(missed) and len(missed) >= 2, (t, i)
            if c["status"] == "ok":
                assert c["upload_bytes"] > 0 and c["upload_bound_bytes"] <= 8 * c["upload_bytes"]
                version[i] = t
            else:
                version[i] = t - 1
        if rec["broadcast_bytes"]:
            broadcasts[t] = rec["broadcast_bytes"]
        assert rec["cum_upload_bytes"] == sum(r["upload_bytes"] for r in records if r["round"] <= t)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_end_to_end_on_digits_lora(name):
    task = digits(mode="lora")
    cfg = SimConfig(rounds=6, fraction=0.5, eval_every=3, verify_sync=True)
    records = Simulation(task, make_algorithm(name), cfg, seed=1).run()
    assert [r["round"] for r in records] == list(range(1, 7))
    assert [r["round"] for r in records if "eval" in r] == [3, 6]
    acc = records[-1]["eval"]["accuracy"]
    assert 0.0 <= acc <= 1.0
    assert all(not r["dropped"] for r in records)
    check_ledger(records, task.num_clients)
    assert any(c["catchup"] != "none" for r in records for c in r["per_client"])  # half the clients per round


@pytest.mark.parametrize("name", FEDAVG_STYLE)
def test_fedavg_style_algorithms_on_the_full_model(name):
    task = digits(mode="full")
    records = Simulation(task, make_algorithm(name), SimConfig(rounds=4, fraction=0.5, verify_sync=True), seed=0).run()
    check_ledger(records, task.num_clients)
    assert records[-1]["eval"]["accuracy"] >= 0.0


def test_fedavg_learns_digits():
    records = Simulation(digits(mode="full"), make_algorithm("fedavg"), SimConfig(rounds=8), seed=0).run()
    assert records[-1]["eval"]["accuracy"] > 0.7


def test_same_seed_same_metrics_bit_for_bit():
    task = digits(mode="lora")
    runs = [
        strip_times(Simulation(task, make_algorithm("fedsrd"), SimConfig(rounds=5, fraction=0.5), seed=3).run())
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other = strip_times(Simulation(task, make_algorithm("fedsrd"), SimConfig(rounds=5, fraction=0.5), seed=4).run())
    assert other != runs[0]


def test_low_precision_values_keep_server_and_clients_identical():
    task = digits(mode="lora")
    cfg = SimConfig(rounds=6, fraction=0.5, upload_dtype="bf16", download_dtype="bf16", verify_sync=True)
    records = Simulation(task, make_algorithm("fedsrd"), cfg, seed=0).run()  # verify_sync raises on any drift
    fp32 = Simulation(task, make_algorithm("fedsrd"), SimConfig(rounds=6, fraction=0.5), seed=0).run()
    assert sum(r["upload_bytes"] for r in records) < sum(r["upload_bytes"] for r in fp32)


def test_a_client_that_missed_rounds_gets_the_cheaper_of_state_and_deltas():
    task = digits(mode="lora", num_clients=10)
    cfg = SimConfig(rounds=12, clients_per_round=2, verify_sync=True)
    # FlexLoRA broadcasts whole states: two missed ones cost more than one state
    flex = Simulation(task, make_algorithm("flexlora"), cfg, seed=0).run()
    kinds = {c["catchup"] for r in flex for c in r["per_client"]}
    assert "state" in kinds
    check_ledger(flex, task.num_clients)
    # FedSRD broadcasts one sparse factor: a few missed ones are cheaper than the state
    srd = Simulation(task, make_algorithm("fedsrd"), cfg, seed=0).run()
    assert "deltas" in {c["catchup"] for r in srd for c in r["per_client"]}
    check_ledger(srd, task.num_clients)


@pytest.mark.parametrize("name", ["flexlora", "fedavg", "fedsrd"])
def test_history_is_pruned_and_old_clients_get_the_state(name):
    task = digits(mode="lora", num_clients=12)
    sim = Simulation(task, make_algorithm(name), SimConfig(rounds=16, clients_per_round=1, verify_sync=True), seed=0)
    records = sim.run()
    check_ledger(records, task.num_clients)  # clients behind pruned broadcasts got the state
    hist = sim.state.history
    # what is kept beyond the newest entry costs less than any full state
    assert sum(len(b) for _, b, _ in hist[1:]) < sim._full_state_cap
    if name == "flexlora":  # every broadcast is a whole state: at most two are worth keeping
        assert len(hist) <= 2 and sim.state.pruned > 0
        assert "state" in {c["catchup"] for r in records for c in r["per_client"]}


class Corrupt(Channel):
    """Flips one byte of one client's upload in one round."""

    def __init__(self, round, client):
        self.round, self.client = round, client

    def upload(self, round, client, data):
        if (round, client) == (self.round, self.client):
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            return bytes(data)
        return data


def test_a_corrupted_upload_is_left_out_and_logged(tmp_path):
    raw = {"name": "corrupt", "algorithms": ["fedsrd"], "task": {"name": "digits", "num_clients": 6},
           "sim": {"rounds": 3, "fraction": 0.5}}  # fmt: skip
    cfg = parse_run_config(raw)
    victim = Simulation(make_task("digits", cfg.task, 0), cfg.make_algorithm("fedsrd"), cfg.sim, seed=0).sample(2)[1]
    run_experiment(cfg, tmp_path / "run", channel=Corrupt(2, victim))
    rd = RunDir(tmp_path / "run")
    records = rd.read_metrics()
    assert len(records) == 3
    r2 = records[1]
    assert r2["accepted"] == len(r2["clients"]) - 1
    assert [d["client"] for d in r2["dropped"]] == [victim]
    assert "upload rejected" in r2["dropped"][0]["reason"] and "checksum" in r2["dropped"][0]["reason"]
    assert r2["broadcast_bytes"] > 0  # the round completed with the others
    log = rd.events.read_text()
    assert f"client {victim} left out" in log and "checksum" in log
    assert records[0]["dropped"] == [] and records[2]["dropped"] == []


class FailingDigits(DigitsTask):
    def train(self, client, trainable, extra_loss, seed):
        if client == self.bad:
            raise RuntimeError("simulated out-of-memory")
        return super().train(client, trainable, extra_loss, seed)


def test_a_client_whose_training_raises_is_left_out():
    task = FailingDigits(digits().config, seed=0)
    task.bad = 3
    records = Simulation(task, make_algorithm("fedavg"), SimConfig(rounds=4, verify_sync=True), seed=0).run()
    for r in records:
        assert [d["client"] for d in r["dropped"]] == [3]
        assert "training failed: RuntimeError: simulated out-of-memory" in r["dropped"][0]["reason"]
        assert r["accepted"] == 7
    check_ledger(records, task.num_clients)


def test_upload_of_the_wrong_round_is_rejected():
    class Replay(Channel):
        def __init__(self):
            self.saved = None

        def upload(self, round, client, data):
            if round == 1 and self.saved is None:
                self.saved = data
            return self.saved if round == 2 and client == 0 else data

    records = Simulation(digits(), make_algorithm("fedavg"), SimConfig(rounds=2), seed=0, channel=Replay()).run()
    assert records[1]["dropped"][0]["client"] == 0
    assert "round 1" in records[1]["dropped"][0]["reason"]


def test_no_accepted_upload_leaves_the_state_unchanged():
    class DropAll(Channel):
        def upload(self, round, client, data):
            return b"garbage" if round == 2 else data

    sim = Simulation(digits(), make_algorithm("fedsrd"), SimConfig(rounds=3, verify_sync=True), seed=0, channel=DropAll())
    records = sim.run()
    assert records[1]["accepted"] == 0 and records[1]["broadcast_bytes"] == 0
    assert records[2]["accepted"] == 8


# --------------------------------------------------------------------------------------------
# checkpoints: kill a run, resume it, get the same result


def write_config(path: Path, rounds: int) -> Path:
    raw = {
        "name": "killme",
        "seed": 5,
        "algorithms": ["fedsrd", "fedavg"],
        "task": {"name": "digits", "num_clients": 20, "local_steps": 20, "lr": 0.05},
        "sim": {"rounds": rounds, "fraction": 0.25, "eval_every": 5},
    }
    path.write_text(dump_toml(raw))
    return path


def test_killed_run_resumes_to_the_same_result(tmp_path):
    from fedlowrank.cli import main

    cfg_file = write_config(tmp_path / "killme.toml", rounds=40)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlowrank.cli", "run", str(cfg_file), "--out", str(killed), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = killed / "fedsrd" / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("run made no progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "fedsrd" / "summary.json").exists()
    assert not (killed / "fedavg" / "metrics.jsonl").exists()
    done_before = len(RunDir(killed / "fedsrd").read_metrics())
    assert 4 <= done_before < 40

    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    assert main(["run", str(cfg_file), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    for alg in ("fedsrd", "fedavg"):
        a = RunDir(killed / alg).read_metrics()
        b = RunDir(tmp_path / "whole" / alg).read_metrics()
        assert [r["round"] for r in a] == list(range(1, 41))
        assert strip_times(a) == strip_times(b)
    sa = load_saved_config(killed)
    assert sa == load_saved_config(tmp_path / "whole")


def test_interrupted_mid_round_resumes_in_process(tmp_path):
    cfg = parse_run_config(
        {"name": "mid", "algorithms": ["ffa-lora"], "task": {"name": "digits", "num_clients": 6},
         "sim": {"rounds": 6, "fraction": 0.5, "eval_every": 2}}  # fmt: skip
    )

    class Interrupt(Channel):
        def upload(self, round, client, data):
            if round == 4:
                raise KeyboardInterrupt  # like Ctrl-C in the middle of round 4
            return data

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "a", channel=Interrupt())
    assert len(RunDir(tmp_path / "a").read_metrics()) == 3
    run_experiment(cfg, tmp_path / "a", resume=True)
    run_experiment(cfg, tmp_path / "b")
    a, b = RunDir(tmp_path / "a").read_metrics(), RunDir(tmp_path / "b").read_metrics()
    assert strip_times(a) == strip_times(b)
    state_a, _ = RunDir(tmp_path / "a").load_checkpoint()
    state_b, _ = RunDir(tmp_path / "b").load_checkpoint()
    assert all(torch.equal(state_a.global_state[k], state_b.global_state[k]) for k in state_b.global_state)


def test_resume_cuts_metrics_written_after_the_last_checkpoint(tmp_path):
    cfg = parse_run_config({"algorithms": ["fedavg"], "task": {"name": "digits"}, "sim": {"rounds": 3}})
    run_experiment(cfg, tmp_path / "r")
    rd = RunDir(tmp_path / "r")
    records = rd.read_metrics()
    # as if killed after round 3's metrics line but before its checkpoint: keep round 2's
    _, meta = rd.load_checkpoint()
    two = dataclasses.replace(cfg.sim, rounds=2)
    partial = Simulation(make_task("digits", cfg.task, 0), cfg.make_algorithm("fedavg"), two, seed=0)
    partial.run()
    rd.save_checkpoint(partial.state, meta)
    rd.summary_json.unlink()
    with open(rd.metrics, "a") as f:
        f.write('{"round": 4, "trunc')  # a line cut by the kill
    run_experiment(cfg, tmp_path / "r", resume=True)
    again = rd.read_metrics()
    assert [r["round"] for r in again] == [1, 2, 3]
    assert strip_times(again) == strip_times(records)


def test_checkpoint_is_written_atomically(tmp_path):
    cfg = parse_run_config({"algorithms": ["fedavg"], "task": {"name": "digits"}, "sim": {"rounds": 2}})
    run_experiment(cfg, tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert not [n for n in names if ".tmp" in n]
    state, meta = RunDir(tmp_path / "r").load_checkpoint()
    assert state.round == 2 and meta["algorithm"] == "fedavg"


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = parse_run_config({"algorithms": ["fedavg"], "task": {"name": "digits"}, "sim": {"rounds": 1}})
    run_experiment(cfg, tmp_path / "r")
    with pytest.raises(FileExistsError):
        run_experiment(cfg, tmp_path / "r")


def test_hundreds_of_clients_keep_no_per_client_tensors():
    task = digits(num_clients=300, partition="labels", local_steps=2)
    sim = Simulation(task, make_algorithm("fedsrd"), SimConfig(rounds=4, clients_per_round=10, eval_every=4), seed=0)
    records = sim.run()
    assert sum(r["accepted"] for r in records) == 40
    assert sim.state.local == {} and sim.state.client_copies == {}  # only the sync round per client
    assert sim.state.versions.shape == (300,)
