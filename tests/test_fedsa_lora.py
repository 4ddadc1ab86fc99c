"""FedSA-LoRA (Guo et al., ICLR 2025): A shared and averaged, B kept on each client."""

from __future__ import annotations

import pytest
import torch

from fedlowrank.algorithms import make_algorithm
from fedlowrank.codec import decode_payload
from fedlowrank.config import ConfigError
from fedlowrank.protocol import ClientHeld
from fedlowrank.sim import SimConfig, Simulation
from fedlowrank.runs.experiment import run_experiment
from fedlowrank.runs.rundir import RunDir
from fedlowrank.runconfig import parse_run_config
from fedlowrank.tasks import make_task


def digits(**kw):
    return make_task("digits", {"mode": "lora", "num_clients": 6, **kw}, 0)


def test_b_never_travels_and_a_is_the_average_of_the_clients_a():
    task = digits()
    sim = Simulation(task, make_algorithm("fedsa-lora"), SimConfig(rounds=1, fraction=1.0), seed=0)
    init = {k: v.clone() for k, v in sim.state.global_state.items()}
    b_keys = [k for k in init if "lora_B" in k]
    assert b_keys and sorted(sim.local_keys) == sorted(b_keys)
    assert not set(sim.upload_shapes) & set(b_keys) and not set(sim.sent) & set(b_keys)
    # the round, client by client by hand: each trains from (shared A, its own B = init)
    trained = []
    for i in range(task.num_clients):
        result, held = sim.transport.worker.train_synced(ClientHeld(0), 1, i, dict(init))
        delta = decode_payload(result.upload, sim.upload_shapes).tensors
        trained.append({**{k: init[k] + delta[k] for k in delta}, **held.local})
    sim.run()
    st = sim.state
    for k in init:
        if "lora_A" in k:  # dense uploads, uniform weights: the mean of the clients' A
            want = torch.stack([t[k] for t in trained]).double().mean(0)
            torch.testing.assert_close(st.global_state[k].double(), want, rtol=1e-5, atol=1e-6)
    for i in range(task.num_clients):
        for k in b_keys:
            torch.testing.assert_close(st.local[i][k], trained[i][k])  # each client keeps its own B
    assert not torch.equal(st.local[0][b_keys[0]], st.local[1][b_keys[0]])
    assert all(torch.equal(st.global_state[k], init[k]) for k in b_keys)  # the server never learns B


def test_partial_participation_evaluates_each_clients_own_model_and_resumes_bit_identically(tmp_path):
    raw = {"name": "sa", "algorithms": ["fedsa-lora"], "seed": 0,
           "task": {"name": "digits", "mode": "lora", "num_clients": 6},
           "sim": {"rounds": 6, "fraction": 0.5, "eval_every": 3}}  # fmt: skip
    cfg = parse_run_config(raw)
    run_experiment(cfg, tmp_path / "full")
    full = RunDir(tmp_path / "full").read_metrics()
    assert full[-1]["eval"]["clients"] == 6  # per-client evaluation (sim.evaluation = "auto")

    class Kill:  # the run dies after round 4 has been written
        def start(self, *a): pass
        def finish(self, *a): pass
        def advance(self, algorithm, record):
            if record["round"] == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "resumed", progress=Kill())
    rd = RunDir(tmp_path / "resumed")
    assert len(rd.load_checkpoint()[0].local) >= 2  # the checkpoint carries the clients' B
    run_experiment(cfg, tmp_path / "resumed", resume=True)
    resumed = rd.read_metrics()
    assert [r["eval"] for r in resumed if "eval" in r] == [r["eval"] for r in full if "eval" in r]
    assert [r["upload_bytes"] for r in resumed] == [r["upload_bytes"] for r in full]


def test_a_state_without_b_matrices_is_a_config_error():
    with pytest.raises(ConfigError, match="no LoRA B matrices"):
        Simulation(make_task("digits", {"mode": "full", "num_clients": 4}, 0), make_algorithm("fedsa-lora"), SimConfig(rounds=1))
