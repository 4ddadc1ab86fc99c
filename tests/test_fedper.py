"""FedPer: the head stays on each client (never uploaded, kept across rounds), the body is averaged."""

import pytest
import torch

from fedlowrank.algorithms import ALGORITHMS, ClientInfo, RoundInfo, make_algorithm
from fedlowrank.algorithms.fedper import FedPer, match_local
from fedlowrank.config import ConfigError
from fedlowrank.runconfig import parse_run_config
from fedlowrank.sim import SimConfig, Simulation
from fedlowrank.runs.experiment import run_experiment
from fedlowrank.tasks import make_task


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "body.0.weight": torch.randn(4, 3, generator=g),
        "body.0.bias": torch.randn(4, generator=g),
        "head.weight": torch.randn(2, 4, generator=g),
        "head.bias": torch.randn(2, generator=g),
    }


def digits(**kw):
    opts = {"num_clients": 6, "local_steps": 5, "lr": 0.05, "min_samples": 4, "mode": "full"}
    return make_task("digits", {**opts, **kw}, seed=0)


def test_registered_with_a_typed_config():
    assert ALGORITHMS["fedper"] is FedPer
    alg = make_algorithm("fedper", {"local": ["head"]})
    assert alg.config.local == ("head",)
    assert alg.local_keys(state()) == ["head.weight", "head.bias"]
    assert alg.sent_keys(state()) == ["body.0.weight", "body.0.bias"]


def test_prefixes_match_whole_module_names_and_the_default_is_the_last_layer():
    keys = ["0.weight", "0.bias", "2.weight", "23.weight", "23.bias"]
    assert match_local(keys, ("2",)) == ["2.weight"]  # not 23.*
    assert match_local(keys, ()) == ["23.weight", "23.bias"]
    assert match_local(keys, ("0", "23.bias")) == ["0.weight", "0.bias", "23.bias"]
    assert make_algorithm("fedper").local_keys(state()) == ["head.weight", "head.bias"]


def test_bad_local_field_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"local: 'classifier' matches no key of the model; its top-level modules are body, head"):
        make_algorithm("fedper", {"local": ["classifier"]}).local_keys(state())
    with pytest.raises(ConfigError, match=r"algorithm\.fedper\.local"):
        make_algorithm("fedper", {"local": [".head"]})
    with pytest.raises(ConfigError, match=r"algorithm\.fedper\.local: expected a list"):
        make_algorithm("fedper", {"local": "head"})
    with pytest.raises(ConfigError, match="local: .* selects every key"):
        make_algorithm("fedper", {"local": ["body", "head"]}).local_keys(state())
    with pytest.raises(ConfigError, match=r"algorithm\.fedper\.locals: unknown field \(did you mean 'local'"):
        parse_run_config({"task": {"name": "digits"}, "algorithms": ["fedper"], "algorithm": {"fedper": {"locals": ["fc2"]}}})


def test_a_bad_prefix_stops_the_run_before_any_training():
    with pytest.raises(ConfigError, match="'head' matches no key"):
        Simulation(digits(), make_algorithm("fedper", {"local": ["head"]}), SimConfig(rounds=1))


def test_upload_and_broadcast_leave_the_head_out():
    alg = make_algorithm("fedper", {"local": ["head"]})
    start = state(0)
    trained = {k: v + 1.0 for k, v in start.items()}
    up = alg.client_payload(start, trained, ClientInfo(1, 0))
    assert set(up.tensors) == {"body.0.weight", "body.0.bias"}
    assert alg.upload_shapes(start) == {"body.0.weight": (4, 3), "body.0.bias": (4,)}
    bc = alg.server_broadcast(start, [up, up], [1, 1], RoundInfo(1))
    assert set(bc.tensors) == {"body.0.weight", "body.0.bias"}


def test_head_is_never_uploaded_is_kept_per_client_and_the_body_is_averaged():
    task = digits()
    sim = Simulation(task, make_algorithm("fedper"), SimConfig(rounds=4, clients_per_round=3, verify_sync=True), seed=0)
    assert sim.local_keys == ["fc2.weight", "fc2.bias"] and sim.personal  # evaluation per client, automatically
    init = {k: v.clone() for k, v in sim.state.global_state.items()}
    seen: dict[int, dict[str, torch.Tensor]] = {}
    for t in range(1, 5):
        before = {i: {k: v.clone() for k, v in sim.state.local.get(i, {}).items()} for i in range(task.num_clients)}
        starts = {}
        worker = sim.transport.worker
        orig = worker.train_synced

        def spy(held, t, client, reference, orig=orig):
            starts[client] = worker.start_state(held, reference)
            return orig(held, t, client, reference)

        worker.train_synced = spy
        rec = sim.round(t)
        worker.train_synced = orig
        clients = rec["clients"]
        for i in clients:
            # a client starts from its own head of its last round (the initial head the first time)
            expect = before[i] or {k: init[k] for k in sim.local_keys}
            for k in sim.local_keys:
                assert torch.equal(starts[i][k], expect[k]), (t, i, k)
            seen[i] = sim.state.local[i]
        for i in set(before) - set(clients):  # clients that sat out keep their head untouched
            for k, v in before[i].items():
                assert torch.equal(sim.state.local[i][k], v)
        # the server never changes the head: it is neither uploaded nor broadcast
        for k in sim.local_keys:
            assert torch.equal(sim.state.global_state[k], init[k])
        # the body is the FedAvg of the clients' bodies (uniform weights by default)
        body = [k for k in init if k not in sim.local_keys]
        for k in body:
            assert not torch.equal(sim.state.global_state[k], starts[clients[0]][k])
        assert rec["upload_bytes"] > 0
    heads = [seen[i]["fc2.weight"] for i in seen]
    assert len(heads) >= 2 and not torch.equal(heads[0], heads[1])  # personal heads differ


def test_uploads_carry_only_the_body():
    task = digits()
    fedavg = Simulation(task, make_algorithm("fedavg"), SimConfig(rounds=1, clients_per_round=2), seed=0).run()
    fedper = Simulation(digits(), make_algorithm("fedper"), SimConfig(rounds=1, clients_per_round=2), seed=0).run()
    head = sum(p.numel() for k, p in task.parameters().items() if k.startswith("fc2.")) * 4 * 2  # fp32, 2 clients
    saved = fedavg[0]["upload_bytes"] - fedper[0]["upload_bytes"]
    assert 0.9 * head < saved < 1.1 * head  # about the head's values (the codec may pack zeros)
    assert fedper[0]["download_bytes"] < fedavg[0]["download_bytes"]


def test_short_run_end_to_end_on_digits(tmp_path):
    cfg = parse_run_config(
        {
            "name": "fedper-digits",
            "algorithms": ["fedavg", "fedper"],
            "task": {"name": "digits", "mode": "full", "num_clients": 10, "partition": "labels",
                     "labels_per_client": 2, "local_steps": 10, "lr": 0.05, "min_samples": 4},  # fmt: skip
            "algorithm": {"fedper": {"local": ["fc2"]}},
            "sim": {"rounds": 8, "clients_per_round": 3, "eval_every": 4, "evaluation": "clients", "threads": 1},
        }
    )
    summaries = run_experiment(cfg, tmp_path / "run")
    by = {s["algorithm"]: s for s in summaries}
    assert by["fedper"]["final"]["clients"] == 10  # per-client evaluation
    # two labels per client: a personal head beats one global model on the clients' own tests
    assert by["fedper"]["accuracy"] > by["fedavg"]["accuracy"]
    assert (tmp_path / "run" / "fedper" / "summary.json").exists()
