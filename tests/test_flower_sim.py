"""The Flower runtime on Flower's simulation engine equals the in-process runtime: same seed,
same sampled clients, same bytes on the wire (per round and per client), same final adapter."""

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from fedlowrank.config import ConfigError  # noqa: E402
from fedlowrank.flower.common import FlowerRunOptions, pack, unpack  # noqa: E402
from fedlowrank.runconfig import load_run_config  # noqa: E402
from fedlowrank.runs.experiment import run_experiment  # noqa: E402
from fedlowrank.runs.rundir import RunDir  # noqa: E402

# 4 clients, 2 sampled per round: round 2 has a client that missed round 1 (a catch-up)

BYTES = ("upload_bytes", "download_bytes", "upload_bound_bytes", "download_bound_bytes", "broadcast_bytes")


ALL = ["fedsrd", "fedsrd-e", "fedsrd-plus", "fedsrd-e-plus", "fedavg", "fedprox", "ffa-lora", "flexlora", "fed-dare",
       "fedavg-magnitude", "fedavg-importance", "fedper", "fedsa-lora", "plus-ef"]


def _config(path, task: str, algorithms: list[str], sim: str, extra: str = "") -> str:
    names = ", ".join(f'"{a}"' for a in algorithms)
    path.write_text(f'name = "eq"\nalgorithms = [{names}]\n[task]\nname = "digits"\n{task}\n[sim]\n{sim}\n{extra}')
    return str(path)


# Every algorithm, in ONE start of the simulation engine (the ServerApp runs them in turn):
# 4 clients, 2 a round, so round 2 has catch-ups. FedPer and FedSA-LoRA keep keys on the nodes and
# are evaluated per client there; plus-ef is fedsrd-plus with client error feedback (its remainder
# lives in the SuperNode's context). The pFedPara model (W2 factors local) runs as the second case.
# fedsrd-plus rebalances: a full-state catch-up must not rebalance again (10 rounds, 1 client a
# round, reach the state catch-ups).
CASES = {
    "lora-every-algorithm": ("mode = \"lora\"\nnum_clients = 4", ALL,
                             "rounds = 2\nfraction = 0.5\neval_every = 1",
                             "[algorithm.plus-ef]\nbase = \"fedsrd-plus\"\nupload_feedback = true\n"),
    "pfedpara-and-state-catch-ups": ("mode = \"pfedpara\"\nnum_clients = 4", ["fedavg", "fedsrd-plus"],
                                     "rounds = 10\nfraction = 0.25\neval_every = 5", ""),
}  # fmt: skip


def _compare(fr: list[dict], ir: list[dict]) -> None:
    """Flower's metrics equal the in-process ones: clients, bytes per round and client, evaluation."""
    assert [r["round"] for r in fr] == [r["round"] for r in ir]
    for f, i in zip(fr, ir, strict=True):
        assert f["runtime"] == "flower" and i["runtime"] == "in-process"
        assert f["clients"] == i["clients"] and f["accepted"] == i["accepted"] == len(i["clients"])
        assert f["dropped"] == i["dropped"] == []
        for key in BYTES:
            assert f[key] == pytest.approx(i[key]), key
        for fc, ic in zip(f["per_client"], i["per_client"], strict=True):
            assert (fc["client"], fc["catchup"], fc["upload_bytes"], fc["download_bytes"]) == (
                ic["client"], ic["catchup"], ic["upload_bytes"], ic["download_bytes"])  # fmt: skip
        assert ("eval" in f) == ("eval" in i)
        if "eval" in i:
            assert f["eval"]["accuracy"] == pytest.approx(i["eval"]["accuracy"])
            assert f["eval"].get("clients") == i["eval"].get("clients")
        assert f.get("diagnostics", {}) == pytest.approx(i.get("diagnostics", {}), rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_algorithm_on_flower_simulation_equals_the_in_process_runtime(tmp_path, case):
    from fedlowrank.flower.simulate import simulate
    from fedlowrank.runconfig import load_run_config

    task, algorithms, sim, extra = CASES[case]
    config = _config(tmp_path / "eq.toml", task, algorithms, sim, extra)
    simulate(config, [], tmp_path / "flower", quiet=True)
    cfg, _ = load_run_config(config, [])
    run_experiment(cfg, tmp_path / "inproc")
    catchups = set()
    for alg in algorithms:
        flower, inproc = RunDir(tmp_path / "flower" / alg), RunDir(tmp_path / "inproc" / alg)
        fr, ir = flower.read_metrics(), inproc.read_metrics()
        _compare(fr, ir)
        catchups |= {c["catchup"] for r in fr for c in r["per_client"]}
        personal = [r["eval"] for r in fr if "eval" in r and "clients" in r["eval"]]
        if alg in ("fedper", "fedsa-lora") or "pfedpara" in task:  # evaluated per client, on the nodes
            assert personal and all(e["clients"] == 4 for e in personal), alg
            assert any("eval_download_bytes" in r for r in fr), alg  # nodes behind were brought up to date
        else:
            assert not personal, alg
        fs, is_ = flower.load_checkpoint()[0].global_state, inproc.load_checkpoint()[0].global_state
        assert fs.keys() == is_.keys()
        for k in fs:
            torch.testing.assert_close(fs[k], is_[k], rtol=1e-6, atol=1e-7, msg=f"{alg} {k}")
    assert catchups >= ({"deltas"} if case.startswith("lora") else {"state"})  # the catch-up paths ran
    for name in ("config.toml", "summary.json", "summary.md", "curves.png"):
        assert (tmp_path / "flower" / name).is_file(), name


@pytest.mark.slow
def test_a_flower_run_killed_mid_way_resumes_to_the_in_process_result(tmp_path):
    """`fedlowrank run --runtime flower` killed with SIGKILL during fedsrd (fedavg done): no Ray
    process is left behind, and --resume skips fedavg and continues fedsrd on fresh SuperNodes,
    which say they hold round 0 and are sent what they miss: the same training as an
    uninterrupted in-process run, plus those catch-up bytes."""
    import signal
    import subprocess
    import sys
    import time

    from test_flower_deployment import alive, descendants

    from fedlowrank.cli import main

    config = _config(tmp_path / "kill.toml", "mode = \"lora\"\nnum_clients = 4\nlocal_steps = 40", ["fedavg", "fedsrd"],
                     "rounds = 6\nfraction = 0.5\neval_every = 2")  # fmt: skip
    out = tmp_path / "flower"
    cli = [sys.executable, "-m", "fedlowrank.cli", "run", config, "--out", str(out), "--runtime", "flower", "--quiet"]
    run = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})  # fmt: skip
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while len(RunDir(out / "fedsrd").read_metrics()) < 2:
            assert time.monotonic() < deadline and run.poll() is None, "the Flower run never reached fedsrd's round 2"
            family |= descendants(run.pid)
            time.sleep(0.05)
        family |= descendants(run.pid)
        os.kill(run.pid, signal.SIGKILL)  # the driver only, as a user's kill -9 would
        run.wait(10)
        deadline = time.monotonic() + 15
        while [p for p in family if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in family if alive(p)], "processes of the killed run are still alive"
    finally:
        for p in family | {run.pid}:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    done = RunDir(out / "fedsrd").load_checkpoint()[0].round
    assert 2 <= done < 6 and not (out / "fedsrd" / "summary.json").exists()
    assert main(["run", "--resume", str(out), "--runtime", "flower", "--quiet"]) == 0
    cfg, _ = load_run_config(config, [])
    run_experiment(cfg, tmp_path / "inproc")
    _compare(RunDir(out / "fedavg").read_metrics(), RunDir(tmp_path / "inproc" / "fedavg").read_metrics())
    fr, ir = RunDir(out / "fedsrd").read_metrics(), RunDir(tmp_path / "inproc" / "fedsrd").read_metrics()
    assert [r["round"] for r in fr] == [1, 2, 3, 4, 5, 6]
    _compare(fr[:done], ir[:done])
    for f, i in zip(fr[done:], ir[done:], strict=True):  # the same training; fresh nodes cost extra catch-up bytes
        assert f["clients"] == i["clients"] and f["upload_bytes"] == i["upload_bytes"]
        assert f["download_bytes"] >= i["download_bytes"]
        if "eval" in i:
            assert f["eval"]["accuracy"] == pytest.approx(i["eval"]["accuracy"])
    fs = RunDir(out / "fedsrd").load_checkpoint()[0].global_state
    is_ = RunDir(tmp_path / "inproc" / "fedsrd").load_checkpoint()[0].global_state
    for k in fs:
        torch.testing.assert_close(fs[k], is_[k], rtol=1e-6, atol=1e-7)
    assert (out / "summary.json").is_file() and (out / "fedsrd" / "summary.json").is_file()


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


def test_the_server_app_stops_after_the_round_in_which_its_watched_process_is_gone():
    """`watch-pid`: a simulation whose `fedlowrank run` was killed stops at the next round
    boundary (its checkpoint written) instead of writing the run directory on its own."""
    import subprocess
    import sys

    from fedlowrank.flower.server_app import DriverGone, _LogProgress

    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    progress = _LogProgress(driver.pid)
    record = {"round": 1, "accepted": 1, "clients": [0], "upload_bytes": 1, "download_bytes": 1}
    progress.start("fedavg", 3, 0)
    progress.advance("fedavg", record)  # alive: goes on
    driver.kill()
    driver.wait()
    with pytest.raises(DriverGone, match=str(driver.pid)):
        progress.advance("fedavg", record)
    _LogProgress(0).advance("fedavg", record)  # no watch (a deployment): never stops


@pytest.mark.slow
def test_causal_lm_on_flower_writes_the_same_adapter_as_the_in_process_runtime(tmp_path):
    """Your data on Flower: the run directory gets the same adapter/ and states/ as in-process."""
    from safetensors.torch import load_file

    from byo_models import lm_rows, write_rows
    from fedlowrank.flower.simulate import simulate

    data = write_rows(lm_rows(24, 3), tmp_path / "rows.jsonl")
    config = tmp_path / "my.toml"
    config.write_text(f'name = "byo"\nalgorithms = ["fedsrd-plus"]\n[task]\nname = "causal-lm"\nmodel = "tiny"\n'
                      f'data = "{data}"\nclient_column = "client"\nlora_rank = 2\nlocal_steps = 2\n'
                      f'[sim]\nrounds = 2\n')  # fmt: skip
    simulate(str(config), [], tmp_path / "flower", quiet=True)
    cfg, _ = load_run_config(str(config), [])
    run_experiment(cfg, tmp_path / "inproc")
    for run in ("flower", "inproc"):
        assert sorted(p.name for p in (tmp_path / run / "states").iterdir()) == ["round-00001.pt", "round-00002.pt"]
    got = load_file(str(tmp_path / "flower" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "inproc" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# one round on the Flower simulation engine for every task but digits (the equality tests above),
# small settings; lm-domains and shakespeare count their clients from their data
TASK_SETS = {
    "lm-domains": ["task.model=tiny", "task.train_examples=4", "task.eval_examples=2", "task.seq_len=64",
                   "task.local_steps=1", "task.ood_domains=[]", "task.lora_rank=2"],
    "shakespeare": ["task.max_clients=3", "task.hidden=16", "task.embed_dim=4", "task.local_steps=1",
                    "task.eval_windows=4"],
    "news-topics": ["task.max_articles=120", "task.max_length=16", "task.num_clients=3", "task.lora_layers=1",
                    "task.local_steps=1"],
    "fashion": ["task.model=pfedpara", "task.train_samples=300", "task.test_samples=100", "task.widths=[4,8]",
                "task.num_clients=3", "task.local_steps=1", "task.min_samples=4"],  # per-client evaluation
    "text-classification": ["task.client_column=client", "task.lora_rank=2", "task.max_length=16",
                            "task.eval_fraction=0.25", "task.local_steps=1"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASK_SETS))
def test_every_task_runs_a_round_on_flower_with_the_same_tree(tmp_path, capfd, task):
    from fedlowrank.cli import main

    sets = list(TASK_SETS[task])
    if task == "fashion":
        from fedlowrank.tasks.fashion import load_fashion_mnist

        try:
            load_fashion_mnist()
        except FileNotFoundError as e:
            pytest.skip(str(e))  # `make install` installs Debian's dataset-fashion-mnist
    if task == "text-classification":
        from byo_models import cls_rows, save_bert, write_rows

        sets += [f"task.model={save_bert(tmp_path / 'bert')}", f"task.data={write_rows(cls_rows(24), tmp_path / 'cls.jsonl')}"]
    config = tmp_path / "my.toml"
    algorithms = ["fedavg", "fedprox"] if task == "lm-domains" else ["fedavg"]
    config.write_text(f'name = "one-round"\nalgorithms = {algorithms}\n[task]\nname = "{task}"\n[sim]\nrounds = 1\n'.replace("'", '"'))
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", str(config), *args, "--out", str(tmp_path / "run"), "--runtime", "flower", "--quiet"]) == 0
    top = tmp_path / "run"
    for name in ("config.toml", "summary.json", "summary.md", "curves.png"):
        assert (top / name).is_file(), name  # the comparison (or the one run), as in-process
    runs = [top / alg for alg in algorithms] if len(algorithms) > 1 else [top]
    for rd in runs:
        [record] = RunDir(rd).read_metrics()
        assert record["runtime"] == "flower" and record["accepted"] == len(record["clients"]) > 0
        assert "eval" in record
        if task == "fashion":
            assert record["eval"]["clients"] == 3  # pFedPara: each node evaluated its own model
    err = capfd.readouterr().err
    assert "DEBUG" not in err and "deprecated" not in err
