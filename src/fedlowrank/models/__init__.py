"""Pretrained and tiny models for the tasks, loaded from installed packages only (no hub)."""

from fedlowrank.models.smollm2 import GGUF_FILE, cached_dir, convert_gguf, gguf_path, load_smollm2
from fedlowrank.models.tiny import ByteTokenizer, tiny_llama

__all__ = ["GGUF_FILE", "cached_dir", "convert_gguf", "gguf_path", "load_smollm2", "ByteTokenizer", "tiny_llama"]
