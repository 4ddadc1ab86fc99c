"""A tiny random Llama and a byte tokenizer, for tests and smoke runs without the real model.

`tiny_llama()` is a `LlamaForCausalLM` of the same architecture as SmolLM2 (RMSNorm, rotary
positions, grouped-query attention, SwiGLU, tied embeddings) with 2 layers and d = 64, so PEFT
LoRA wraps the same module names (q_proj ... down_proj) and every code path of the `lm-domains`
task runs in milliseconds. Its weights are random (seeded by the caller's torch seed).
"""

from __future__ import annotations

import torch

__all__ = ["ByteTokenizer", "tiny_llama"]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and an end-of-sequence id 256 (the subset of a Hugging
    Face tokenizer's interface that the tasks use)."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def tiny_llama(num_layers: int = 2, hidden: int = 64, vocab_size: int = ByteTokenizer.vocab_size):
    """A random-initialised LlamaForCausalLM (eval mode) with `num_layers` layers of width `hidden`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=ByteTokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model
