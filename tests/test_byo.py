"""Your model, your data: the `causal-lm` and `text-classification` tasks end to end through the
CLI on tiny random models and data files the tests write themselves; adapters exported as PEFT
folders reproduce the run's final evaluation; bad input fails before training, by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from byo_models import cls_rows, lm_rows, save_bert, save_gpt2, save_llama, write_rows
from fedlowrank.cli import main
from fedlowrank.config import ConfigError
from fedlowrank.runconfig import parse_run_config
from fedlowrank.tasks import make_task
from fedlowrank.tasks.causal_lm import IGNORE


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("byo")
    save_llama(d / "llama")
    save_gpt2(d / "gpt2")
    save_bert(d / "bert")
    rows = lm_rows()
    write_rows(rows, d / "lm.jsonl")
    write_rows(rows, d / "lm.csv")
    write_rows(rows, d / "lm.parquet")
    for c in ("c0", "c1", "c2"):
        write_rows([r for r in rows if r["client"] == c], d / f"client-{c}.jsonl")
    write_rows(cls_rows(), d / "cls.parquet")
    write_rows(cls_rows(), d / "cls.jsonl")
    return d


def _toml(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, task: dict, algorithms=("fedsrd", "fedavg"), rounds: int = 3) -> Path:
    lines = ['name = "my-run"', f"algorithms = {_toml(list(algorithms))}", "[task]"]
    lines += [f"{k} = {_toml(v)}" for k, v in task.items()]
    lines += ["[sim]", f"rounds = {rounds}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def final_eval(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["eval"]


def _lm_loss(model, task) -> float:
    """Completion loss of a plain `model(input_ids).logits` forward over the task's eval rows."""
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for x, y in task.evaluate_batches(None):
            logits = model(input_ids=x).logits
            keep = y != IGNORE
            loss_sum += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
            tokens += int(keep.sum())
    return loss_sum / tokens


# --- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, data, clients, algorithms",
    [
        ("llama", "lm.jsonl", "column", ("fedsrd-plus", "fedavg")),  # the contract config
        ("gpt2", "lm.csv", "column", ("fedsrd", "fedavg")),
        ("llama", "lm.parquet", "dirichlet", ("fedsrd", "fedavg")),
        ("gpt2", ["client-c0.jsonl", "client-c1.jsonl", "client-c2.jsonl"], "files", ("fedsrd", "fedavg")),
    ],
)
def test_causal_lm_end_to_end_and_the_adapter_reproduces_the_run(root, tmp_path, model, data, clients, algorithms):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    task = {"name": "causal-lm", "model": str(root / model),
            "data": [str(root / d) for d in data] if isinstance(data, list) else str(root / data),
            "prompt_column": "prompt", "completion_column": "completion", "lora_rank": 4}  # fmt: skip
    if clients == "column":
        task["client_column"] = "client"
    if clients == "dirichlet":
        task.update(partition="dirichlet", num_clients=3, partition_column="client", alpha=1.0)
    cfg = write_config(tmp_path / "my.toml", task, algorithms=algorithms)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    for alg in algorithms:
        adapter = out / alg / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file()
        saved = json.loads((adapter / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == str((root / model).resolve())
        built = make_task("causal-lm", parse_run_config(__import__("tomllib").loads(cfg.read_text())).task, 0).build()
        assert built.num_clients == 3
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / model), adapter).eval()
        assert _lm_loss(peft_model, built) == pytest.approx(final_eval(out / alg)["loss"], abs=1e-5)
    # training moved the adapter: the final loss differs from the untrained model's
    base = AutoModelForCausalLM.from_pretrained(root / model).eval()
    assert abs(_lm_loss(base, built) - final_eval(out / "fedavg")["loss"]) > 1e-4


def test_export_merged_gives_base_plus_adapter_logits_and_generate_prints(root, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path / "my.toml", {"name": "causal-lm", "model": str(root / "llama"), "data": str(root / "lm.jsonl"),
                                             "client_column": "client", "lora_rank": 4}, algorithms=["fedsrd"])  # fmt: skip
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "llama"), out / "adapter").eval()
    x = torch.tensor([[5, 17, 33, 41, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, peft_model(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    # an evaluated earlier round exports too (every round is evaluated here), an unknown one names the kept ones
    assert main(["export", str(out), "--out", str(tmp_path / "round2"), "--round", "2"]) == 0
    assert (tmp_path / "round2" / "adapter_model.safetensors").is_file()
    assert main(["export", str(out), "--out", str(tmp_path / "round9"), "--round", "9"]) == 2
    assert "kept rounds" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "the cat and", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_fedper_writes_each_clients_own_adapter(root, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path / "my.toml", {"name": "causal-lm", "model": str(root / "llama"), "data": str(root / "lm.jsonl"),
                                             "client_column": "client", "lora_rank": 2}, algorithms=["fedper"], rounds=2)  # fmt: skip
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    clients = sorted(p.name for p in (out / "adapter" / "clients").iterdir())
    assert clients == ["c0", "c1", "c2"]
    built = make_task("causal-lm", parse_run_config(__import__("tomllib").loads(cfg.read_text())).task, 0).build()
    losses = []
    for i, name in enumerate(clients):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "llama"), out / "adapter" / "clients" / name).eval()
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for x, y in built.evaluate_batches(i):
                keep = y != IGNORE
                loss_sum += float(F.cross_entropy(model(input_ids=x).logits[keep], y[keep], reduction="sum"))
                tokens += int(keep.sum())
        losses.append(loss_sum / tokens)
    # FedPer evaluates each client's own state on its own rows (mean weighted by rows): the exported
    # client adapters give the same
    rows = [len(built.client_eval[i]) for i in range(3)]
    assert sum(l * n for l, n in zip(losses, rows)) / sum(rows) == pytest.approx(final_eval(out)["loss"], abs=1e-5)
    from safetensors.torch import load_file

    own = [load_file(str(out / "adapter" / "clients" / n / "adapter_model.safetensors")) for n in clients]
    assert any(not torch.equal(own[0][k], own[1][k]) for k in own[0])  # personal layers differ


def test_messages_rows_use_the_chat_template_and_learn_the_last_turn_only(root, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}],
             "client": f"c{i % 2}"} for i, w in enumerate(["cat", "dog", "mat", "ball", "red", "big"] * 2)]  # fmt: skip
    write_rows(rows, tmp_path / "chat.jsonl")
    task = make_task("causal-lm", {"model": str(root / "llama"), "data": str(tmp_path / "chat.jsonl"),
                                   "client_column": "client", "lora_rank": 2}, 0).build()  # fmt: skip
    tok = task.tokenizer
    ids, n_prompt = task.client_items[0][0]
    prompt = tok.decode(ids[:n_prompt].tolist())
    assert prompt.startswith("<|user|>say ") and prompt.endswith("<|assistant|>")
    assert tok.decode(ids[n_prompt:].tolist()).endswith("<|end|><|end|>")  # the turn's end and the eos


def test_text_classification_end_to_end_and_the_adapter_reproduces_the_run(root, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    task = {"name": "text-classification", "model": str(root / "bert"), "data": str(root / "cls.parquet"),
            "client_column": "client", "lora_rank": 4, "max_length": 16, "eval_fraction": 0.25}  # fmt: skip
    cfg = write_config(tmp_path / "my.toml", task)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    built = make_task("text-classification", parse_run_config(__import__("tomllib").loads(cfg.read_text())).task, 0).build()
    for alg in ("fedsrd", "fedavg"):
        base = AutoModelForSequenceClassification.from_pretrained(root / "bert", num_labels=3)
        model = PeftModel.from_pretrained(base, out / alg / "adapter").eval()
        loss_sum, n = 0.0, 0
        with torch.no_grad():
            for x, y in built.evaluate_batches(None):
                logits = model(input_ids=built.ids[x], attention_mask=built.mask[x]).logits
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                n += y.numel()
        assert loss_sum / n == pytest.approx(final_eval(out / alg)["loss"], abs=1e-5)


def test_mean_pooling_in_the_top_layers_exports_adapter_and_head(root, tmp_path, monkeypatch):
    """news-topics' model on your data: LoRA in the top layer only, mean pooling, the frozen
    prefix cached; the exported adapter + classifier.safetensors reproduce the final loss."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    monkeypatch.setenv("FEDLOWRANK_CACHE", str(tmp_path / "cache"))
    task = {"name": "text-classification", "model": str(root / "bert"), "data": str(root / "cls.jsonl"),
            "client_column": "client", "lora_rank": 4, "max_length": 16, "pooling": "mean", "lora_layers": 1,
            "target_modules": ["query", "value"]}  # fmt: skip
    cfg = write_config(tmp_path / "my.toml", task, algorithms=["fedsrd"])
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert list((tmp_path / "cache").glob("text-classification-*.pt"))  # the frozen prefix, cached
    built = make_task("text-classification", parse_run_config(__import__("tomllib").loads(cfg.read_text())).task, 0).build()
    assert {k for k in built.initial_state() if "lora_A" in k} == {"encoder.layer.1.attention.self.query.lora_A",
                                                                  "encoder.layer.1.attention.self.value.lora_A"}
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(root / "bert"), out / "adapter").eval()
    head = load_file(str(out / "adapter" / "classifier.safetensors"))
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for x, y in built.evaluate_batches(None):
            enc = built.tokenizer([built.texts[int(i)] for i in x], max_length=16, truncation=True,
                                  padding="max_length", return_tensors="pt")  # fmt: skip
            ids, mask = enc["input_ids"], enc["attention_mask"]
            h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            w = mask.unsqueeze(-1).float()
            logits = ((h * w).sum(1) / w.sum(1)) @ head["weight"].T + head["bias"]
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            n += y.numel()
    assert loss_sum / n == pytest.approx(final_eval(out)["loss"], abs=1e-5)


def test_text_classification_dirichlet_partition_over_the_label(root):
    task = make_task("text-classification", {"model": str(root / "bert"), "data": str(root / "cls.jsonl"),
                                             "partition": "dirichlet", "num_clients": 4, "alpha": 0.3,
                                             "max_length": 16}, 0).build()  # fmt: skip
    assert task.num_clients == 4
    assert sum(task.num_samples(i) for i in range(4)) + task.test_idx.size == 60


# --- bad input: each a clear error before training ----------------------------------------------


def _error(options, root, task="causal-lm") -> str:
    with pytest.raises(ConfigError) as e:
        make_task(task, {"model": str(root / "llama"), "lora_rank": 2, **options}, 0).build()
    return str(e.value)


def test_bad_input_names_what_is_wrong(root, tmp_path):
    data = str(root / "lm.jsonl")
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    assert "no config.json" in _error({"model": str(no_config), "data": data, "client_column": "client"}, root)
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((root / "llama" / "config.json").read_text())
    assert "no tokenizer" in _error({"model": str(no_tok), "data": data, "client_column": "client"}, root)
    assert "does not exist" in _error({"data": str(tmp_path / "nope.jsonl"), "client_column": "client"}, root)
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in _error({"data": str(tmp_path / "empty.jsonl"), "client_column": "client"}, root)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b", "client": "x"}\n{"prompt": "a",\n')
    assert "line 2 is not valid JSON" in _error({"data": str(tmp_path / "bad.jsonl"), "client_column": "client"}, root)
    msg = _error({"data": data, "client_column": "site"}, root)
    assert "no column 'site' (client_column)" in msg and "'prompt'" in msg
    msg = _error({"data": data, "client_column": "client", "completion_column": "answer", "format": "prompt-completion"}, root)
    assert "no column 'answer' (completion_column)" in msg
    assert "40 clients (num_clients) but only 36 rows" in _error({"data": data, "partition": "iid", "num_clients": 40}, root)
    write_rows([{"prompt": "a", "completion": "b", "client": "solo"}] + lm_rows(6, 2), tmp_path / "solo.jsonl")
    assert "client 'solo' has 1 row(s)" in _error({"data": str(tmp_path / "solo.jsonl"), "client_column": "client"}, root)
    msg = _error({"data": data, "client_column": "client", "target_modules": ["qkv_nowhere"]}, root)
    assert "matches no module" in msg and "q_proj" in msg
    assert "exceeds the model's maximum of 256" in _error({"data": data, "client_column": "client", "seq_len": 512}, root)
    write_rows([{"text": f"t {i}", "label": "same", "client": f"c{i % 2}"} for i in range(8)], tmp_path / "one.jsonl")
    msg = _error({"model": str(root / "bert"), "data": str(tmp_path / "one.jsonl"), "client_column": "client"}, root,
                 task="text-classification")  # fmt: skip
    assert "one class only" in msg
    with pytest.raises(ConfigError, match="^task.model"):
        parse_run_config({"task": {"name": "causal-lm", "model": "gpt2", "data": data}, "algorithms": ["fedavg"]})


def test_a_bad_data_file_fails_through_the_cli_before_anything_is_written(root, tmp_path, capsys):
    cfg = write_config(tmp_path / "my.toml", {"name": "causal-lm", "model": str(root / "llama"),
                                             "data": str(root / "lm.jsonl"), "client_column": "site"})  # fmt: skip
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "no column 'site' (client_column)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # the same command works once the config is fixed


def test_lora_on_a_convolution_is_a_config_error_naming_the_module():
    from torch import nn

    from fedlowrank.models.hf import LoRAConfig, apply_lora

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

    with pytest.raises(ConfigError, match="'conv' is a convolution"):
        apply_lora(Net(), LoRAConfig(lora_rank=2, target_modules=("conv", "fc")))


def test_a_run_where_no_client_trains_exits_non_zero(root, tmp_path, capsys, monkeypatch):
    from fedlowrank.sim import runtime

    cfg = write_config(tmp_path / "my.toml", {"name": "causal-lm", "model": str(root / "llama"), "data": str(root / "lm.jsonl"),
                                             "client_column": "client", "lora_rank": 2}, algorithms=["fedavg"], rounds=2)  # fmt: skip
    monkeypatch.setattr(runtime.Channel, "upload", lambda self, round, client, data: b"not a payload")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "nothing trained" in err and "in any of 2 rounds" in err
    assert not (tmp_path / "run" / "adapter").exists()  # no adapter that looks like a result
