"""Tasks: partitions, the digits models, and one short real news-topics run (MiniLM + LoRA on BBC News)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlowrank.algorithms import make_algorithm
from fedlowrank.config import ConfigError
from fedlowrank.lora import lora_pairs
from fedlowrank.sim import SimConfig, Simulation
from fedlowrank.tasks import make_task, task_config
from fedlowrank.tasks.base import PartitionConfig, partition_labels


def labels(n_per_class=60, classes=5):
    return np.repeat(np.arange(classes), n_per_class)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_partition_deals_every_sample_once(alpha):
    y = labels()
    parts, shares = partition_labels(y, 5, PartitionConfig(num_clients=7, alpha=alpha, min_samples=1), seed=3)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(y.size))
    assert shares.shape == (5, 7) and np.allclose(shares.sum(1), 1)
    again, _ = partition_labels(y, 5, PartitionConfig(num_clients=7, alpha=alpha, min_samples=1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_small_alpha_skews_labels_more_than_large():
    y = labels(200)

    def skew(alpha):
        parts, _ = partition_labels(y, 5, PartitionConfig(num_clients=10, alpha=alpha, min_samples=1), seed=0)
        return np.mean([np.bincount(y[p], minlength=5).max() / max(1, p.size) for p in parts])

    assert skew(0.1) > skew(100.0) + 0.2


def test_label_group_partition():
    y = labels()
    cfg = PartitionConfig(num_clients=5, partition="labels", labels_per_client=2)
    parts, _ = partition_labels(y, 5, cfg, seed=0)
    for i, p in enumerate(parts):
        assert set(np.unique(y[p])) == {i, (i + 1) % 5}
    with pytest.raises(ValueError, match="classes"):
        partition_labels(y, 5, PartitionConfig(num_clients=2, partition="labels", labels_per_client=1), seed=0)


def test_impossible_dirichlet_split_says_what_to_change():
    with pytest.raises(ValueError, match="min_samples"):
        partition_labels(labels(5), 5, PartitionConfig(num_clients=20, alpha=0.05, min_samples=5), seed=0)


def test_digits_lora_mode_uses_our_lora_naming():
    task = make_task("digits", {"mode": "lora", "lora_rank": 3}, seed=0).build()
    state = task.initial_state()
    pairs = lora_pairs(state)
    assert set(pairs) == {"fc1", "fc2"}
    assert state["fc1.lora_A"].shape == (3, 64) and state["fc1.lora_B"].shape == (32, 3)
    assert torch.count_nonzero(state["fc1.lora_B"]) == 0 and torch.count_nonzero(state["fc1.lora_A"]) > 0
    assert "fc2.bias" in state and "fc1.weight" not in state  # the base stays frozen


def test_digits_full_mode_trains_everything():
    task = make_task("digits", {"mode": "full"}, seed=0).build()
    assert set(task.initial_state()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_same_seed_same_model_and_partition():
    a = make_task("digits", {}, seed=4).build()
    b = make_task("digits", {}, seed=4).build()
    assert all(torch.equal(a.initial_state()[k], b.initial_state()[k]) for k in a.initial_state())
    assert all(np.array_equal(p, q) for p, q in zip(a.parts, b.parts, strict=True))


def test_task_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"task.mode: got 'half'"):
        task_config("digits", {"mode": "half"})
    with pytest.raises(ConfigError, match=r"task.local_steps: must lie in \[1, 1000000\], got 0"):
        task_config("news-topics", {"local_steps": 0})
    with pytest.raises(ConfigError, match=r"task.local_steps: must lie in \[1, 1000000\]"):
        task_config("digits", {"local_steps": 10**12})  # no unbounded work from one config field
    with pytest.raises(ConfigError, match=r"task.target_modules"):
        task_config("news-topics", {"target_modules": ["q_proj"]})


# --------------------------------------------------------------------------------------------
# news-topics: a short real run (subsampled articles, short sequences, two rounds)

NEWS = {
    "max_articles": 250,
    "max_length": 32,
    "num_clients": 4,
    "alpha": 1.0,
    "lora_layers": 1,
    "local_steps": 3,
    "batch_size": 8,
    "lr": 0.003,
}


@pytest.fixture(scope="module")
def news_task(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FEDLOWRANK_CACHE")
    os.environ["FEDLOWRANK_CACHE"] = str(cache)
    try:
        task = make_task("news-topics", NEWS, seed=0).build()
        yield task, cache
    finally:
        if old is None:
            os.environ.pop("FEDLOWRANK_CACHE", None)
        else:
            os.environ["FEDLOWRANK_CACHE"] = old


def test_news_topics_data_model_and_cache(news_task):
    task, cache = news_task
    assert task.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(task.labels) == 250 and task.test_idx.size == 50
    assert sum(task.num_samples(i) for i in range(4)) == 200
    state = task.initial_state()
    assert set(lora_pairs(state)) == {"layer5.query", "layer5.value"}
    assert state["layer5.query.lora_A"].shape == (8, 384) and state["layer5.query.lora_B"].shape == (384, 8)
    assert torch.count_nonzero(state["layer5.value.lora_B"]) == 0
    assert {"classifier.weight", "classifier.bias"} <= set(state)
    files = list(cache.glob("news-topics-*.pt"))
    assert len(files) == 1
    again = make_task("news-topics", NEWS, seed=0).build()  # loads the cached frozen prefix
    assert torch.equal(again.hidden, task.hidden) and torch.equal(again.mask, task.mask)


def test_news_topics_has_no_article_in_both_a_training_and_a_test_split(news_task):
    """The BBC corpus repeats 98 articles verbatim; they are dropped before splitting."""
    from fedlowrank.tasks.news_topics import load_bbc_news

    texts, labels, _ = load_bbc_news()
    assert len(texts) == len(set(texts)) == 2127 and len(load_bbc_news(dedup=False)[0]) == 2225
    task, _ = news_task
    train = {task.texts[i] for i in task.train_idx}
    assert not train & {task.texts[i] for i in task.test_idx}


def test_news_topics_short_federated_run(news_task):
    task, _ = news_task
    results = {}
    for name in ("fedsrd", "fedavg"):
        cfg = SimConfig(rounds=4, clients_per_round=2, verify_sync=True)
        records = Simulation(task, make_algorithm(name), cfg, seed=0).run()
        final = records[-1]["eval"]
        assert final["samples"] == 50
        assert final["accuracy"] > 0.3  # 5 classes: chance is 0.2
        results[name] = sum(r["upload_bytes"] for r in records)
    assert results["fedsrd"] < results["fedavg"] / 3  # sparse uploads


# --------------------------------------------------------------------------------------------
# pFedPara: the model's local parts stay on each client


def test_pfedpara_local_factors_never_leave_the_client():
    task = make_task("digits", {"mode": "pfedpara", "num_clients": 6, "lr": 0.02}, seed=0)
    sim = Simulation(task, make_algorithm("fedavg"), SimConfig(rounds=4, fraction=0.5, verify_sync=True), seed=0)
    local = task.local_keys()
    assert local and all(".w2." in k for k in local)
    assert set(sim.upload_shapes).isdisjoint(local) and set(sim.sent).isdisjoint(local)
    records = sim.run()
    assert "clients" in records[-1]["eval"]  # evaluated per client on its own test split
    init = task.initial_state()
    trained = [i for i in range(6) if i in sim.state.local]
    assert trained and all(set(sim.state.local[i]) == set(local) for i in trained)
    a, b = sim.state.local[trained[0]], sim.state.local[trained[1]]
    assert any(not torch.equal(a[k], b[k]) for k in local)  # personal, not averaged
    assert all(torch.equal(sim.state.global_state[k], init[k]) for k in local)  # the server never saw them


# --------------------------------------------------------------------------------------------
# fashion: Fashion-MNIST from Debian's dataset-fashion-mnist


def fashion_or_skip():
    from fedlowrank.tasks.fashion import load_fashion_mnist

    try:
        load_fashion_mnist()
    except FileNotFoundError as e:
        pytest.skip(str(e))


FASHION = {"train_samples": 1000, "test_samples": 200, "widths": [8, 16], "num_clients": 4, "local_steps": 3, "min_samples": 4}


@pytest.mark.parametrize("model, gamma", [("plain", 0.1), ("fedpara", 0.1), ("fedpara", 0.9), ("lowrank", 0.1), ("pfedpara", 0.5)])
def test_fashion_models_run_with_fedavg(model, gamma):
    fashion_or_skip()
    task = make_task("fashion", {**FASHION, "model": model, "gamma": gamma}, seed=0)
    records = Simulation(task, make_algorithm("fedavg"), SimConfig(rounds=2, clients_per_round=2, verify_sync=True), seed=0).run()
    assert records[-1]["eval"]["samples"] == 200
    assert records[-1]["upload_bytes"] > 0
    if model == "pfedpara":
        assert "clients" in records[-1]["eval"] and task.local_keys()


def test_fashion_fedpara_head_personalises_the_classifier_too():
    fashion_or_skip()
    from fedlowrank.fedpara import PFedParaLinear

    convs = make_task("fashion", {**FASHION, "model": "pfedpara", "gamma": 0.5}, seed=0).build()
    both = make_task("fashion", {**FASHION, "model": "pfedpara", "gamma": 0.5, "fedpara_head": True}, seed=0).build()
    head = list(both.model.children())[-1]
    assert isinstance(head, PFedParaLinear) and not isinstance(list(convs.model.children())[-1], PFedParaLinear)
    extra = set(both.local_keys()) - set(convs.local_keys())
    assert extra and all(k.startswith(f"{len(list(both.model.children())) - 1}.w2.") for k in extra)
    records = Simulation(both, make_algorithm("fedavg"), SimConfig(rounds=2, clients_per_round=2, verify_sync=True), seed=0).run()
    assert "clients" in records[-1]["eval"]


def test_fashion_fedpara_sends_fewer_bytes_than_plain():
    fashion_or_skip()
    sent = {}
    for model in ("plain", "fedpara", "lowrank"):
        task = make_task("fashion", {**FASHION, "model": model, "gamma": 0.1}, seed=0).build()
        params = sum(p.numel() for p in task.parameters().values())
        records = Simulation(task, make_algorithm("fedavg"), SimConfig(rounds=1, clients_per_round=2), seed=0).run()
        sent[model] = (params, records[0]["upload_bytes"])
    assert sent["fedpara"][0] < sent["plain"][0] / 2
    assert sent["fedpara"][1] < sent["plain"][1] / 2
    assert abs(sent["lowrank"][0] - sent["fedpara"][0]) < 0.2 * sent["fedpara"][0]  # same budget
