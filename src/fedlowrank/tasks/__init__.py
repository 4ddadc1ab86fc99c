"""Tasks: a model, federated data partitions, a local training loop and an evaluation.

Registered by name; each module is imported only when its task is used, so listing tasks or
checking a config never loads transformers or a data set.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fedlowrank.config import ConfigError, did_you_mean, from_mapping
from fedlowrank.tasks.base import PartitionConfig, Task, TrainConfig

__all__ = ["TASKS", "Task", "TrainConfig", "PartitionConfig", "task_class", "task_config", "make_task"]

# name -> (module:class, one line for `fedlowrank list`)
TASKS: dict[str, tuple[str, str]] = {
    "digits": ("fedlowrank.tasks.digits:DigitsTask", "scikit-learn digits, tiny MLP (LoRA, full or pFedPara); for tests"),
    "news-topics": (
        "fedlowrank.tasks.news_topics:NewsTopicsTask",
        "BBC News 5-way topics, all-MiniLM-L6-v2 + PEFT LoRA (query, value)",
    ),
    "fashion": (
        "fedlowrank.tasks.fashion:FashionTask",
        "Fashion-MNIST, small VGG-style CNN with GroupNorm: plain, FedPara, low-rank or pFedPara",
    ),
    "lm-domains": (
        "fedlowrank.tasks.lm_domains:LMDomainsTask",
        "SmolLM2-135M + PEFT LoRA, one client per text domain (code, math, business, literature)",
    ),
    "causal-lm": (
        "fedlowrank.tasks.causal_lm:CausalLMTask",
        "your causal LM (a Hugging Face folder) on your JSONL / CSV / parquet files + PEFT LoRA (docs/byo.md)",
    ),
    "text-classification": (
        "fedlowrank.tasks.text_classification:TextClassificationTask",
        "your encoder (a Hugging Face folder, or MiniLM) on your text + label files + PEFT LoRA (docs/byo.md)",
    ),
    "shakespeare": (
        "fedlowrank.tasks.shakespeare:ShakespeareTask",
        "Shakespeare next-character prediction, one client per speaking role (LEAF), LSTM / FedPara LSTM",
    ),
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}{did_you_mean(name, TASKS)}; available: {', '.join(sorted(TASKS))}")
    module, _, cls = TASKS[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def task_config(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """The task's typed config from a `[task]` table (without its `name`), errors by field."""
    return from_mapping(task_class(name).Config, dict(options or {}), where="task")


def make_task(name: str, config: Any, seed: int = 0) -> Task:
    cls = task_class(name)
    if not isinstance(config, cls.Config):
        config = task_config(name, config)
    return cls(config, seed)
