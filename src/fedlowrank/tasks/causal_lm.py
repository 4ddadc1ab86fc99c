"""`causal-lm`: federated LoRA fine-tuning of any local causal LM on your own data files.

* Model (`model`): a local Hugging Face folder (Llama, Qwen2, GPT-2, ... anything transformers
  loads as a causal LM), or `smollm2` / `tiny` (packaged; fedlowrank.models.hf). PEFT LoRA on
  `target_modules` ("all-linear" by default), `lora_rank`, `lora_alpha` (0: 2 x rank),
  `lora_dropout`, `use_rslora`.
* Data (`data`, `eval_data`; fedlowrank.data.federate): local JSONL / JSON / CSV / parquet files
  read through Hugging Face `datasets`, strictly offline; clients from a client column, one file
  per client, or a Flower Datasets partitioner.
* Rows (`format`, "auto" picks by the columns present): `prompt_column` + `completion_column`
  (loss on the completion only), `messages_column` (chat turns rendered by the tokenizer's chat
  template; the loss is on the last assistant turn, the turns before it are the prompt), or
  `text_column` (loss on every token after the first).
* Sequences: prompt tokens, completion tokens and an end-of-sequence token, at most `seq_len`
  tokens (0, the default: 256 or the model's maximum if smaller) (a long prompt loses its start, the completion keeps at least half the window; a long
  completion loses its end). No special tokens are added besides the end token. Logits are
  computed only at positions that carry loss (the head over padding would be wasted work).
* State: the adapter; keys are PEFT's parameter names without the wrapper and body prefixes
  and the `.default.weight` suffix, e.g. `layers.0.self_attn.q_proj.lora_A` (Llama) or
  `h.0.attn.c_attn.lora_A` (GPT-2). `save_adapter` writes a state as a PEFT folder.

Evaluation: `loss` (nats per completion token over every evaluation token), `perplexity` =
exp(loss), next-token `accuracy`, and per client `{client}_loss` / `{client}_ppl` (up to 32
clients); `evaluate(client)` scores that client's own evaluation rows.

`lm-domains` is this task with the packaged domain corpora as its rows (tasks/lm_domains.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.config import ConfigError, choice, require
from fedlowrank.data.domains import Example
from fedlowrank.data.federate import ClientDataConfig, federate
from fedlowrank.data.tables import DataError
from fedlowrank.models.hf import (
    TINY_BASE_NAME,
    LoRAConfig,
    apply_lora,
    check_model_name,
    load_tokenizer,
    max_positions,
    model_folder,
    save_merged,
    state_key,
)
from fedlowrank.tasks.base import Batch, Task, TrainConfig, batches

__all__ = ["CausalLMTask", "CausalLMBase", "CausalLMConfig", "LMTrainConfig", "Example", "tokenize_example", "collate", "IGNORE", "FORMATS"]

IGNORE = -100  # target of positions that carry no loss (prompt, padding)
FORMATS = ("auto", "prompt-completion", "messages", "text")
PER_CLIENT_METRICS = 32  # clients up to which evaluate() reports each client's loss


Item = tuple[torch.Tensor, int]  # token ids, number of prompt tokens among them


def tokenize_example(tokenizer, example: Example, seq_len: int) -> Item:
    """(token ids, number of prompt tokens among them) of prompt + completion + end token."""
    p = tokenizer.encode(example.prompt, add_special_tokens=False) if example.prompt else []
    c = tokenizer.encode(example.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    keep_c = min(len(c), max(seq_len - len(p), seq_len // 2))
    keep_p = min(len(p), seq_len - keep_c)
    ids = p[len(p) - keep_p :] + c[:keep_c]
    return torch.tensor(ids, dtype=torch.long), keep_p


def collate(items: list[Item], pad_id: int) -> Batch:
    """Right-padded inputs (N, L) and next-token targets (N, L), IGNORE off the completions.

    targets[i, t] is the token at t + 1 when that token belongs to the completion. Padding sits
    after every real token, so a causal model needs no attention mask.
    """
    L = max(ids.numel() for ids, _ in items)
    x = torch.full((len(items), L), pad_id, dtype=torch.long)
    y = torch.full((len(items), L), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(items):
        n, start = ids.numel(), max(n_prompt, 1)  # without a prompt the first token is context
        x[i, :n] = ids
        y[i, start - 1 : n - 1] = ids[start:]
    return x, y


@dataclass(frozen=True)
class LMTrainConfig(TrainConfig):
    """Local training defaults of the causal-LM tasks (causal-lm, lm-domains): AdamW, 10 steps."""

    batch_size: int = 4
    lr: float = 3e-4
    eval_batch_size: int = 8


@dataclass(frozen=True)
class CausalLMConfig(ClientDataConfig, LoRAConfig, LMTrainConfig):
    # a Hugging Face model folder, or "tiny" (a random 2-layer Llama for tests)
    model: str = "tiny"
    # how rows become text: "prompt-completion", "messages" (chat template), "text", or "auto" from the columns
    format: Literal["auto", "prompt-completion", "messages", "text"] = "auto"
    # format "prompt-completion": the prompt (loss on the completion only)
    prompt_column: str = "prompt"
    # format "prompt-completion": the completion
    completion_column: str = "completion"
    # format "messages": a list of {role, content}
    messages_column: str = "messages"
    # format "text": plain text (loss on every token)
    text_column: str = "text"
    seq_len: int = 0  # tokens per sequence; 0: min(256, the model's maximum)

    def __post_init__(self) -> None:
        check_model_name(self.model, ("smollm2", "tiny"))
        TrainConfig.__post_init__(self)
        LoRAConfig.__post_init__(self)
        ClientDataConfig.__post_init__(self)
        choice(self.format, "format", FORMATS)
        require(self.seq_len == 0 or 16 <= self.seq_len <= 131072, "seq_len",
                f"must be 0 (min(256, the model's maximum)) or lie in [16, 131072], got {self.seq_len}")  # fmt: skip


class CausalLMBase(Task):
    """A causal LM with a PEFT adapter and tokenized client examples; subclasses say where the
    model and the rows come from (`_load_model`, `_load_clients`)."""

    # --- building ---------------------------------------------------------------------------
    def _load_model(self) -> tuple[nn.Module, Any, str]:
        """(base model in eval mode, tokenizer, base_model_name_or_path for adapters)."""
        cfg = self.config
        folder = model_folder(cfg.model, {"smollm2": _smollm2_folder, "tiny": None})
        if folder is None:
            from fedlowrank.models.tiny import ByteTokenizer, tiny_llama

            return tiny_llama(), ByteTokenizer(), TINY_BASE_NAME
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        tokenizer = load_tokenizer(folder)
        try:
            base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - any load failure is the folder's
            raise ConfigError(f"model: {folder} does not load as a causal LM ({type(e).__name__}: {e})") from None
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"model: the tokenizer of {folder} has no end-of-sequence token (eos_token)")
        base.eval()
        return base, tokenizer, str(folder)

    def _load_clients(self) -> None:
        """Set self.client_names, self.client_items, self.client_eval, self.global_eval."""
        raise NotImplementedError

    def _build(self) -> None:
        cfg = self.config
        base, self.tokenizer, self.base_name = self._load_model()
        limit = max_positions(base.config)
        if limit is not None and cfg.seq_len > limit:
            raise ConfigError(f"seq_len: {cfg.seq_len} exceeds the model's maximum of {limit} positions")
        self.seq_len = cfg.seq_len or min(256, limit or 256)
        self.num_classes = int(base.config.vocab_size)
        self.model = apply_lora(base, cfg, base_name=self.base_name)
        inner = self.model.get_base_model()
        self._prefix = getattr(inner, "base_model_prefix", "")
        self._body, self._head = inner.base_model, inner.get_output_embeddings()
        if self._body is inner or self._head is None:
            raise ConfigError(f"model: {type(inner).__name__} has no separate body and output head")
        self._pad = int(self.tokenizer.eos_token_id)
        self._keys = {state_key(n, self._prefix): p for n, p in self.model.named_parameters() if "lora_" in n}
        self._load_clients()

    def tokenize(self, examples: Sequence[Example]) -> list[Item]:
        return [tokenize_example(self.tokenizer, ex, self.seq_len) for ex in examples]

    @staticmethod
    def by_length(items: list[Item]) -> list[Item]:
        return sorted(items, key=lambda t: t[0].numel())  # evaluation batches with little padding

    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._keys)

    def peft_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state under PEFT's saved-adapter key names (`...q_proj.lora_A.weight`)."""
        prefix = f"base_model.model.{self._prefix}." if self._prefix else "base_model.model."
        return {f"{prefix}{k}.weight": v for k, v in state.items()}

    # --- adapters and generation ------------------------------------------------------------
    def save_adapter(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        """Write `state` as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)."""
        self.load(state)
        self.model.save_pretrained(str(path))

    def save_merged(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        """Write base + `state` merged into one Hugging Face model folder (with the tokenizer)."""
        self.load(state)
        save_merged(self.model, self.tokenizer, path)

    @torch.no_grad()
    def generate(self, state: dict[str, torch.Tensor], prompt: str, max_new_tokens: int = 64) -> str:
        """Greedy completion of `prompt` by the model with `state` loaded."""
        self.load(state)
        self.model.eval()
        ids = torch.tensor([self.tokenizer.encode(prompt, add_special_tokens=False)], dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("generate: the prompt is empty")
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self._pad, eos_token_id=self._pad)  # fmt: skip
        return self.tokenizer.decode(out[0, ids.shape[1] :].tolist())

    # --- data -------------------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return len(self.client_items)

    def num_samples(self, client: int) -> int:
        return len(self.client_items[client])

    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        items = self.client_items[client]
        for b in batches(len(items), self.config.batch_size, generator):
            yield collate([items[int(i)] for i in b], self._pad)

    def item_batches(self, items: list[Item]) -> Iterator[Batch]:
        bs = self.config.eval_batch_size
        for s in range(0, len(items), bs):
            yield collate(items[s : s + bs], self._pad)

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        yield from self.item_batches(self.global_eval if client is None else self.client_eval[client])

    def has_client_tests(self) -> bool:
        return all(self.client_eval)

    # --- model ------------------------------------------------------------------------------
    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over completion tokens, their logits (M, vocab))."""
        x, y = batch
        hidden = self._body(input_ids=x, use_cache=False).last_hidden_state  # (N, L, d)
        keep = y != IGNORE
        logits = self._head(hidden[keep])  # (M, vocab): completion positions only
        return F.cross_entropy(logits, y[keep]), logits

    @torch.no_grad()
    def score(self, items: list[Item]) -> dict[str, float]:
        """Completion loss (nats per token), perplexity and token accuracy of the loaded state."""
        loss_sum, correct, tokens = 0.0, 0, 0
        for x, y in self.item_batches(items):
            hidden = self._body(input_ids=x, use_cache=False).last_hidden_state
            keep = y != IGNORE
            logits = self._head(hidden[keep])
            target = y[keep]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == target).sum())
            tokens += int(target.numel())
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "accuracy": correct / max(tokens, 1),
                "tokens": tokens, "samples": len(items)}  # fmt: skip


def _smollm2_folder() -> Path:
    from fedlowrank.models.smollm2 import cached_dir, convert_gguf

    folder = cached_dir()
    if not (folder / "model.safetensors").is_file():
        convert_gguf(folder)
    return folder.resolve()


class CausalLMTask(CausalLMBase):
    name = "causal-lm"
    Config = CausalLMConfig

    def _format(self, columns: Sequence[str]) -> str:
        cfg: CausalLMConfig = self.config
        if cfg.format != "auto":
            return cfg.format
        if cfg.prompt_column in columns and cfg.completion_column in columns:
            return "prompt-completion"
        if cfg.messages_column in columns:
            return "messages"
        if cfg.text_column in columns:
            return "text"
        raise DataError(
            f"{cfg.files[0]}: found neither {cfg.prompt_column!r} + {cfg.completion_column!r} (prompt_column, "
            f"completion_column), nor {cfg.messages_column!r} (messages_column), nor {cfg.text_column!r} "
            f"(text_column); the file has columns {list(columns)}"
        )

    def _columns(self, fmt: str) -> dict[str, str]:
        cfg: CausalLMConfig = self.config
        return {"prompt-completion": {cfg.prompt_column: "prompt_column", cfg.completion_column: "completion_column"},
                "messages": {cfg.messages_column: "messages_column"},
                "text": {cfg.text_column: "text_column"}}[fmt]  # fmt: skip

    def _example(self, row: dict[str, Any], fmt: str) -> Example:
        cfg: CausalLMConfig = self.config
        if fmt == "prompt-completion":
            p, c = row[cfg.prompt_column], row[cfg.completion_column]
            if not isinstance(p, str) or not isinstance(c, str):
                raise DataError(f"{cfg.files[0]}: {cfg.prompt_column!r} and {cfg.completion_column!r} must be text, "
                                f"got {type(p).__name__} and {type(c).__name__}")  # fmt: skip
            return Example(p, c)
        if fmt == "text":
            t = row[cfg.text_column]
            if not isinstance(t, str):
                raise DataError(f"{cfg.files[0]}: {cfg.text_column!r} must be text, got {type(t).__name__}")
            return Example("", t)
        return self._chat_example(row[cfg.messages_column])

    def _chat_example(self, messages: Any) -> Example:
        cfg: CausalLMConfig = self.config
        where = f"{cfg.files[0]}: {cfg.messages_column!r}"
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where} must be a non-empty list of {{role, content}} turns")
        if messages[-1].get("role") != "assistant":
            raise DataError(f"{where}: the last turn must be the assistant's (it is what the model learns)")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError(f"model: {cfg.model} has no chat template, so {cfg.messages_column!r} rows cannot be "
                              "rendered; use prompt / completion columns")  # fmt: skip
        turns = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
        full = self.tokenizer.apply_chat_template(turns, tokenize=False)
        prompt = self.tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True) if len(turns) > 1 else ""
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render the earlier turns as a prefix of the whole")
        return Example(prompt, full[len(prompt) :])

    def _load_clients(self) -> None:
        cfg: CausalLMConfig = self.config
        fed = federate(cfg, lambda names: self._columns(self._format(names)), self.seed)
        fmt = self._format(fed.source_columns)
        self.client_names = [c.name for c in fed.clients]
        self.client_items = [self.tokenize([self._example(r, fmt) for r in c.train]) for c in fed.clients]
        self.client_eval = [self.by_length(self.tokenize([self._example(r, fmt) for r in c.eval])) for c in fed.clients]
        self.global_eval = self.by_length(self.tokenize([self._example(r, fmt) for r in fed.global_eval]))
        if not self.global_eval:
            raise DataError("no evaluation rows: give eval_data or keep eval_fraction > 0")
        for name, items in zip(self.client_names, self.client_items):
            if not any(ids.numel() > max(n, 1) for ids, n in items):
                raise DataError(f"client {name!r}: no training row leaves a token to learn within seq_len = {self.seq_len}")

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model, "clients": self.num_clients,
                "rows": {n: {"train": len(t), "eval": len(e)} for n, t, e in zip(self.client_names, self.client_items, self.client_eval)},
                "adapter_parameters": int(sum(p.numel() for p in self.parameters().values()))}  # fmt: skip

    @torch.no_grad()
    def evaluate(self, client: int | None = None) -> dict[str, float]:
        self.model.eval()
        if client is not None:
            r = self.score(self.client_eval[client])
            return {"accuracy": r["accuracy"], "loss": r["loss"], "perplexity": r["ppl"], "samples": r["samples"]}
        r = self.score(self.global_eval)
        out = {"accuracy": r["accuracy"], "loss": r["loss"], "perplexity": r["ppl"], "samples": r["samples"]}
        if self.num_clients <= PER_CLIENT_METRICS and self.has_client_tests():
            for name, items in zip(self.client_names, self.client_eval):
                c = self.score(items)
                out[f"{name}_loss"], out[f"{name}_ppl"] = c["loss"], c["ppl"]
        return out

