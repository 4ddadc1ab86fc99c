"""The Flower runtime on Flower's simulation engine equals the in-process runtime: same seed,
same sampled clients, same bytes on the wire (per round and per client), same final adapter."""

import dataclasses
import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from fedlowrank.config import ConfigError  # noqa: E402
from fedlowrank.flower.common import FlowerRunOptions, pack, unpack  # noqa: E402
from fedlowrank.runconfig import load_run_config  # noqa: E402
from fedlowrank.sim.experiment import run_experiment  # noqa: E402
from fedlowrank.sim.rundir import RunDir  # noqa: E402

# 4 clients, 2 sampled per round: round 2 has a client that missed round 1 (a catch-up)
SET = ["task.num_clients=4", "sim.rounds=2", "sim.fraction=0.5", "sim.eval_every=1"]
BYTES = ("upload_bytes", "download_bytes", "upload_bound_bytes", "download_bound_bytes", "broadcast_bytes")


# fedsrd-plus: rebalancing (full-state catch-ups at rounds 8 and 9 must not rebalance again) and
# client error feedback (its remainder lives in the SuperNode's context) on one client a round
PLUS_SET = ["task.num_clients=4", "sim.rounds=10", "sim.fraction=0.25", "sim.eval_every=5",
            "algorithm.fedsrd-plus.upload_feedback=true"]


# FedSA-LoRA: B stays on the SuperNodes (Flower evaluates globally: per-client evaluation is not
# built there yet). Client error feedback runs in the fedsrd-plus case (PLUS_SET).
SA_SET = [*SET, "sim.evaluation=global", "sim.rounds=3"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,overrides,catchup", [
    ("fedsrd", SET, "deltas"), ("fedsrd-plus", PLUS_SET, "state"), ("fedsa-lora", SA_SET, "deltas"),
])  # fmt: skip
def test_fedsrd_on_flower_simulation_equals_the_in_process_runtime(tmp_path, algorithm, overrides, catchup):
    from flwr.simulation import run_simulation

    from fedlowrank.flower.client_app import app as client_app
    from fedlowrank.flower.server_app import make_server_app

    opts = {"config": "digits-all", "algorithm": algorithm, "set": ";".join(overrides),
            "out-dir": str(tmp_path / "flower"), "round-timeout": 60.0}  # fmt: skip
    run_simulation(
        make_server_app(opts), client_app, num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "num_gpus": 0}},
    )  # fmt: skip
    cfg, _ = load_run_config("digits-all", overrides)
    run_experiment(dataclasses.replace(cfg, algorithms=(algorithm,)), tmp_path / "inproc")

    flower, inproc = RunDir(tmp_path / "flower"), RunDir(tmp_path / "inproc")
    fr, ir = flower.read_metrics(), inproc.read_metrics()
    rounds = list(range(1, cfg.sim.rounds + 1))
    assert [r["round"] for r in fr] == rounds and [r["round"] for r in ir] == rounds
    for f, i in zip(fr, ir, strict=True):
        assert f["clients"] == i["clients"] and f["accepted"] == i["accepted"] == len(i["clients"])
        assert f["dropped"] == i["dropped"] == []
        for key in BYTES:
            assert f[key] == pytest.approx(i[key]), key
        for fc, ic in zip(f["per_client"], i["per_client"], strict=True):
            assert (fc["client"], fc["catchup"], fc["upload_bytes"], fc["download_bytes"]) == (
                ic["client"], ic["catchup"], ic["upload_bytes"], ic["download_bytes"])  # fmt: skip
        if "eval" in i:
            assert f["eval"]["accuracy"] == pytest.approx(i["eval"]["accuracy"])
        assert f["diagnostics"] == pytest.approx(i["diagnostics"], rel=1e-5, abs=1e-7)
    assert any(c["catchup"] == catchup for r in fr for c in r["per_client"])  # the catch-up path ran
    fs, is_ = flower.load_checkpoint()[0].global_state, inproc.load_checkpoint()[0].global_state
    assert fs.keys() == is_.keys()
    for k in fs:
        torch.testing.assert_close(fs[k], is_[k], rtol=1e-6, atol=1e-7)
    assert flower.summary_json.exists() and (tmp_path / "flower" / "config.toml").exists()


def test_codec_bytes_travel_in_an_array_of_our_own_stype():
    record = pack([b"FLRK\x01abc", b""])
    assert unpack(record) == [b"FLRK\x01abc", b""]
    assert record.count_bytes() == len(b"FLRK\x01abc") + 2  # data plus the keys "0" and "1": no header


def test_run_config_keys_are_checked():
    opts = FlowerRunOptions.from_run_config({"num-server-rounds": 3, "set": "task.num_clients=2; sim.fraction=1.0"})
    assert opts.overrides() == ["task.num_clients=2", "sim.fraction=1.0", "sim.rounds=3"]
    with pytest.raises(ConfigError, match="unknown key 'num-rounds'"):
        FlowerRunOptions.from_run_config({"num-rounds": 3})
    with pytest.raises(ConfigError, match="round-timeout must be float"):
        FlowerRunOptions.from_run_config({"round-timeout": "soon"})


@pytest.mark.slow
def test_causal_lm_on_flower_writes_the_same_adapter_as_the_in_process_runtime(tmp_path):
    """Your data on Flower: the run directory gets the same adapter/ and states/ as in-process."""
    from flwr.simulation import run_simulation
    from safetensors.torch import load_file

    from byo_models import lm_rows, write_rows
    from fedlowrank.flower.client_app import app as client_app
    from fedlowrank.flower.server_app import make_server_app

    data = write_rows(lm_rows(24, 3), tmp_path / "rows.jsonl")
    config = tmp_path / "my.toml"
    config.write_text(f'name = "byo"\nalgorithms = ["fedsrd-plus"]\n[task]\nname = "causal-lm"\nmodel = "tiny"\n'
                      f'data = "{data}"\nclient_column = "client"\nlora_rank = 2\nlocal_steps = 2\n'
                      f'[sim]\nrounds = 2\n')  # fmt: skip
    opts = {"config": str(config), "out-dir": str(tmp_path / "flower"), "round-timeout": 120.0}
    run_simulation(
        make_server_app(opts), client_app, num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "num_gpus": 0}},
    )  # fmt: skip
    cfg, _ = load_run_config(str(config), [])
    run_experiment(cfg, tmp_path / "inproc")
    for run in ("flower", "inproc"):
        assert sorted(p.name for p in (tmp_path / run / "states").iterdir()) == ["round-00001.pt", "round-00002.pt"]
    got = load_file(str(tmp_path / "flower" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "inproc" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# one round on the Flower simulation engine for the tasks whose clients come from their data
# (these crashed before the runtime asked the task for its client count)
TASK_SETS = {
    "lm-domains": ["task.model=tiny", "task.train_examples=4", "task.eval_examples=2", "task.seq_len=64",
                   "task.local_steps=1", "task.ood_domains=[]", "task.lora_rank=2"],
    "shakespeare": ["task.max_clients=3", "task.hidden=16", "task.embed_dim=4", "task.local_steps=1",
                    "task.eval_windows=4"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASK_SETS))
def test_every_data_defined_task_runs_a_round_on_flower_with_the_same_tree(tmp_path, capfd, task):
    from fedlowrank.cli import main

    config = tmp_path / "my.toml"
    algorithms = ["fedavg", "fedprox"] if task == "lm-domains" else ["fedavg"]  # one Ray start each: keep few
    config.write_text(f'name = "one-round"\nalgorithms = {algorithms}\n[task]\nname = "{task}"\n[sim]\nrounds = 1\n'.replace("'", '"'))
    sets = [a for s in TASK_SETS[task] for a in ("--set", s)]
    assert main(["run", str(config), *sets, "--out", str(tmp_path / "run"), "--runtime", "flower", "--quiet"]) == 0
    top = tmp_path / "run"
    for name in ("config.toml", "summary.json", "summary.md", "curves.png"):
        assert (top / name).is_file(), name  # the comparison (or the one run), as in-process
    if len(algorithms) > 1:
        for alg in algorithms:
            assert (top / alg / "summary.json").is_file()
    err = capfd.readouterr().err
    assert "DEBUG" not in err and "deprecated" not in err
