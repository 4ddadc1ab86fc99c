"""`lm-domains`: sequences and loss masks, the adapter state, every LoRA algorithm through the
runtime (on a tiny random Llama), and the real SmolLM2 loaded offline from its package, cached,
and fine-tuned for two FedSRD rounds."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fedlowrank.algorithms import ALGORITHMS, make_algorithm
from fedlowrank.config import ConfigError, from_mapping
from fedlowrank.data.domains import Example
from fedlowrank.lora import lora_pairs
from fedlowrank.models import ByteTokenizer
from fedlowrank.sim import SimConfig, Simulation
from fedlowrank.tasks.lm_domains import IGNORE, LMDomainsConfig, LMDomainsTask, collate, tokenize_example

TINY = {"model": "tiny", "train_examples": 8, "eval_examples": 3, "seq_len": 64, "batch_size": 4,
        "local_steps": 3, "lr": 1e-2, "lora_rank": 4}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are small enough that a second thread only adds
    synchronisation, and on a busy 2-core machine two threads run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_task(**kw) -> LMDomainsTask:
    return LMDomainsTask(LMDomainsConfig(**{**TINY, **kw}), seed=0).build()


@pytest.fixture(scope="module")
def tiny():
    return tiny_task(clients_per_domain=2)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, field",
    [
        ({"domains": ["medical"]}, "task.domains"),
        ({"domains": []}, "task.domains"),
        ({"ood_domains": ["code"]}, "task.ood_domains"),
        ({"domains": ["code", "code"]}, "task.domains"),
        ({"clients_per_domain": 9, "train_examples": 8}, "task.train_examples"),
        ({"seq_len": 8}, "task.seq_len"),
        ({"lora_dropout": 1.0}, "task.lora_dropout"),
        ({"model": "gpt2"}, "task.model"),
    ],
)
def test_config_errors_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        from_mapping(LMDomainsConfig, options, where="task")


def test_config_defaults_follow_the_paper_layout():
    cfg = LMDomainsConfig()
    assert cfg.domains == ("code", "math", "business", "literature")
    assert cfg.ood_domains == ("politics", "tech")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.seq_len) == (16, 0.0, 256)  # alpha 0 means 2r


# --- sequences -----------------------------------------------------------------------------


def test_loss_only_on_completion_and_end_token():
    tok = ByteTokenizer()
    ids, n_prompt = tokenize_example(tok, Example("Q: 1+1?\nA:", " 2"), seq_len=64)
    assert ids.tolist() == list(b"Q: 1+1?\nA: 2") + [tok.eos_token_id] and n_prompt == 10
    x, y = collate([(ids, n_prompt), (ids[:11], 10)], pad_id=tok.eos_token_id)
    assert x.shape == y.shape == (2, 13)
    # position t predicts token t + 1: the completion " 2" and the end token
    assert y[0].tolist() == [IGNORE] * 9 + [ord(" "), ord("2"), tok.eos_token_id, IGNORE]
    assert y[1].tolist() == [IGNORE] * 9 + [ord(" ")] + [IGNORE] * 3  # padding carries no loss


def test_truncation_keeps_the_prompt_end_and_the_completion_start():
    tok = ByteTokenizer()
    ids, n_prompt = tokenize_example(tok, Example("p" * 100 + "END:", "c" * 100), seq_len=32)
    assert ids.numel() == 32 and n_prompt == 16  # the completion keeps half the window
    assert bytes(ids[:n_prompt].tolist()).endswith(b"END:") and set(ids[n_prompt:].tolist()) == {ord("c")}
    ids, n_prompt = tokenize_example(tok, Example("short:", "c" * 100), seq_len=32)
    assert n_prompt == 6 and ids.numel() == 32 and tok.eos_token_id not in ids.tolist()


def test_batch_loss_equals_transformers_loss_on_masked_labels(tiny):
    x, y = next(tiny.client_batches(0, torch.Generator().manual_seed(0)))
    labels = torch.full_like(x, IGNORE)  # transformers shifts labels itself
    labels[:, 1:] = y[:, :-1]
    tiny.model.eval()
    with torch.no_grad():
        ours, logits = tiny.batch_loss((x, y))
        theirs = tiny.model(input_ids=x, labels=labels).loss
    assert logits.shape == (int((y != IGNORE).sum()), tiny.num_classes)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# --- state, clients, evaluation ------------------------------------------------------------


def test_state_is_the_peft_adapter_under_short_names(tiny):
    state = tiny.state()
    pairs = lora_pairs(state)
    assert len(pairs) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down; never the head
    assert "layers.0.self_attn.q_proj" in pairs and "layers.1.mlp.down_proj" in pairs
    for b_key, a_key in pairs.values():
        assert state[a_key].shape[0] == state[b_key].shape[1] == 4
        assert torch.count_nonzero(state[b_key]) == 0 and torch.count_nonzero(state[a_key]) > 0
    from peft import get_peft_model_state_dict

    peft_keys = set(get_peft_model_state_dict(tiny.model))
    assert set(tiny.peft_state_dict(state)) == peft_keys
    assert tiny.model.peft_config["default"].lora_alpha == 8  # 2 x rank by default


def test_save_adapter_writes_a_peft_folder(tiny, tmp_path):
    state = {k: v + 0.5 for k, v in tiny.state().items()}
    tiny.save_adapter(state, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == tiny.peft_state_dict(state).keys()
    for k, v in tiny.peft_state_dict(state).items():
        assert torch.equal(saved[k], v)
    tiny.load(tiny.initial_state())


def test_clients_per_domain_split_each_domain(tiny):
    assert tiny.num_clients == 8
    assert tiny.client_domain == ["code", "code", "math", "math", "business", "business", "literature", "literature"]
    assert [tiny.num_samples(i) for i in range(8)] == [4] * 8
    a, b = (set(id(t[0]) for t in tiny.client_items[i]) for i in (0, 1))
    assert not a & b


def test_evaluation_reports_every_domain_and_the_averages(tiny):
    r = tiny.evaluate()
    for d in ("code", "math", "business", "literature", "politics", "tech"):
        assert math.isclose(r[f"{d}_ppl"], math.exp(r[f"{d}_loss"]), rel_tol=1e-9)
        assert 0.0 <= r[f"{d}_accuracy"] <= 1.0
    ind = [r[f"{d}_loss"] for d in ("code", "math", "business", "literature")]
    assert math.isclose(r["in_domain_loss"], sum(ind) / 4, rel_tol=1e-9)
    assert math.isclose(r["ood_loss"], (r["politics_loss"] + r["tech_loss"]) / 2, rel_tol=1e-9)
    assert r["loss"] == r["in_domain_loss"] and r["samples"] == 4 * 3
    own = tiny.evaluate(2)  # a math client: the math held-out set
    assert own["loss"] == pytest.approx(r["math_loss"]) and own["samples"] == 3


def test_local_training_lowers_the_loss_on_its_own_domain():
    task = tiny_task(local_steps=15)
    before = task.evaluate(1)["loss"]
    task.train(1, list(task.state()), None, seed=0)
    assert task.evaluate(1)["loss"] < before - 0.1


# FedPer (a per-client head) and FedSA-LoRA (per-client B) are evaluated per client, without ood_loss
@pytest.mark.parametrize("algorithm", sorted(set(ALGORITHMS) - {"fedper", "fedsa-lora"}))
def test_every_lora_algorithm_runs_with_partial_participation(algorithm):
    task = tiny_task(clients_per_domain=2, local_steps=2)
    sim = Simulation(task, make_algorithm(algorithm), SimConfig(rounds=2, clients_per_round=3), seed=0)
    records = sim.run()
    assert all(r["accepted"] == 3 and not r["dropped"] for r in records)
    assert math.isfinite(records[-1]["eval"]["in_domain_loss"]) and "ood_loss" in records[-1]["eval"]
    assert records[0]["upload_bytes"] > 0 and records[0]["download_bytes"] > 0


# --- the real model ------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No hub: any attempt to reach one fails instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.slow
def test_smollm2_loads_from_the_package_and_its_cache_matches_the_gguf(offline, tmp_path):
    from fedlowrank.models import cached_dir, load_smollm2

    model, tok = load_smollm2()  # the shared cache (converted on first use)
    assert (cached_dir() / "model.safetensors").is_file()
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.tie_word_embeddings) == (30, 576, 49152, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tok.decode(int(logits.argmax())) == " Paris"

    again, _ = load_smollm2(cache=tmp_path)  # the cold path: de-quantize the GGUF file again
    assert (cached_dir(tmp_path) / "model.safetensors").is_file() and cached_dir(tmp_path).name == cached_dir().name
    with torch.no_grad():
        assert torch.equal(again(ids).logits[0, -1], logits)


@pytest.mark.slow
def test_smollm2_two_fedsrd_rounds_lower_the_loss_on_every_client_domain(offline):
    """The issue's acceptance test: the real model, offline, two FedSRD rounds, small data."""
    cfg = LMDomainsConfig(train_examples=8, eval_examples=4, seq_len=64, batch_size=4, local_steps=2,
                          lr=3e-3, ood_domains=("politics",), eval_batch_size=8)  # fmt: skip
    t0 = time.perf_counter()
    task = LMDomainsTask(cfg, seed=0).build()
    build_s = time.perf_counter() - t0
    sim = Simulation(task, make_algorithm("fedsrd"), SimConfig(rounds=2, eval_every=2), seed=0)
    task.load(sim.state.global_state)
    before = task.evaluate()
    records = sim.run()
    after = records[-1]["eval"]
    print(f"\nbuild {build_s:.1f}s; rounds {[round(r['wall_seconds'], 1) for r in records]} s")
    for d in (*cfg.domains, "in_domain", *cfg.ood_domains):
        print(f"  {d:<12} loss {before[f'{d}_loss']:.4f} -> {after[f'{d}_loss']:.4f}")
    assert all(r["accepted"] == 4 for r in records)
    for d in cfg.domains:
        assert after[f"{d}_loss"] < before[f"{d}_loss"], d
    # FedSRD sends a small fraction of the dense adapter (4.88M fp32 values = 19.5 MB)
    dense = 4 * sum(v.numel() for v in task.state().values())
    assert records[0]["broadcast_bytes"] < 0.2 * dense
    assert max(c["upload_bytes"] for c in records[0]["per_client"]) < 0.2 * dense
