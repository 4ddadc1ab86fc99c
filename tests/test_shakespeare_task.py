"""`shakespeare`: LEAF clients and windows, the LSTM in plain, FedPara and low-rank forms, and
federated runs through the runtime."""

from __future__ import annotations

import math

import pytest
import torch

from fedlowrank.algorithms import make_algorithm
from fedlowrank.config import ConfigError, from_mapping
from fedlowrank.data.shakespeare import encode, role_texts
from fedlowrank.sim import SimConfig, Simulation
from fedlowrank.tasks.shakespeare import ShakespeareConfig, ShakespeareTask

SMALL = {"max_clients": 6, "eval_windows": 16, "local_steps": 3, "hidden": 64}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small recurrent steps: a second thread only adds synchronisation
    yield
    torch.set_num_threads(before)


def task(**kw) -> ShakespeareTask:
    return ShakespeareTask(ShakespeareConfig(**{**SMALL, **kw}), seed=0).build()


@pytest.mark.parametrize(
    "options, field",
    [({"model": "tucker"}, "task.model"), ({"gamma": 1.5}, "task.gamma"), ({"target": "prev"}, "task.target"),
     ({"test_fraction": 1.0}, "task.test_fraction"), ({"min_speeches": 0}, "task.min_speeches")],
)  # fmt: skip
def test_config_errors_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        from_mapping(ShakespeareConfig, options, where="task")


def test_defaults_are_leaf_reference_network():
    cfg = ShakespeareConfig()
    assert (cfg.embed_dim, cfg.hidden, cfg.num_layers, cfg.seq_len, cfg.target) == (8, 256, 2, 80, "next")


def test_clients_are_roles_split_in_time():
    t = task()
    texts = role_texts(min_speeches=64)
    assert t.num_clients == 6 and all(name in texts for name in t.client_names)
    assert t.client_names == sorted(t.client_names)
    assert t.client_names == task().client_names  # seeded sample
    assert t.client_names != ShakespeareTask(ShakespeareConfig(**SMALL), seed=1).build().client_names
    for i, name in enumerate(t.client_names):
        ids = torch.from_numpy(encode(texts[name]).astype("int64"))
        cut = t.train_text[i].numel()
        assert torch.equal(t.train_text[i], ids[:cut]) and cut == round(0.8 * ids.numel())
        assert t.num_samples(i) == cut - 80
        x, y = t.X_test[t.test_slices[i]].long(), t.y_test[t.test_slices[i]].long()
        assert x.shape == (16, 80)
        test = ids[cut:]  # every test window and its label lie in the held-out tail
        starts = [int(s) for s in range(test.numel() - 80) if torch.equal(test[s : s + 80], x[0])]
        assert starts and test[starts[0] + 80] == y[0]


def test_windows_next_character_and_every_character():
    t = task()
    x, y = next(t.client_batches(0, torch.Generator().manual_seed(0)))
    assert x.shape == (10, 80) and y.shape == (10,)
    text = t.train_text[0]
    s = next(i for i in range(text.numel() - 80) if torch.equal(text[i : i + 80], x[0]))
    assert y[0] == text[s + 80]
    ta = task(target="all")
    x, y = next(ta.client_batches(0, torch.Generator().manual_seed(0)))
    assert y.shape == (10, 80) and torch.equal(x[:, 1:], y[:, :-1])
    loss, logits = ta.batch_loss((x, y))
    assert logits.shape == (10, 80, 97) and loss.ndim == 0


def test_fedpara_and_lowrank_lstms_cost_the_same_and_less_than_plain():
    plain, fed, low = (task(model=m, hidden=256).describe() for m in ("plain", "fedpara", "lowrank"))
    assert plain["lstm_parameters"] == 4 * 256 * (8 + 256 + 2) + 4 * 256 * (256 + 256 + 2)  # nn.LSTM
    assert fed["lstm_parameters"] == low["lstm_parameters"] < plain["lstm_parameters"] / 3
    t = task(model="fedpara")
    assert set(t.state()) == {k for k, _ in t.model.named_parameters()}
    assert any(".ih." in k for k in t.state())  # the factors travel, not built weights


@pytest.mark.parametrize("model", ["plain", "fedpara", "lowrank"])
def test_local_training_lowers_the_loss(model):
    t = task(model=model, target="all", local_steps=40, lr=2.0)
    before = t.evaluate(0)
    t.train(0, list(t.state()), None, seed=0)
    after = t.evaluate(0)
    assert after["loss"] < before["loss"] - 0.3 and after["samples"] == 16 * 80


def test_federated_rounds_send_fewer_bytes_with_fedpara():
    runs = {}
    for model in ("plain", "fedpara"):
        sim = Simulation(task(model=model, target="all"), make_algorithm("fedavg"),
                         SimConfig(rounds=2, clients_per_round=3), seed=0)  # fmt: skip
        runs[model] = sim.run()
    for records in runs.values():
        assert all(r["accepted"] == 3 for r in records) and math.isfinite(records[-1]["eval"]["loss"])
    up = {m: r[0]["upload_bytes"] for m, r in runs.items()}
    assert up["fedpara"] < 0.6 * up["plain"]


def test_personal_evaluation_uses_each_clients_own_windows():
    t = task()
    assert t.has_client_tests()
    sizes = [t.evaluate(i)["samples"] for i in range(t.num_clients)]
    assert sizes == [16] * 6 and t.evaluate(None)["samples"] == 96
