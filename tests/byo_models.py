"""Tiny random Hugging Face models and data files written by the tests themselves (no downloads):
a Llama-style and a GPT-2-style causal LM and a BERT-style encoder, each with a byte-level BPE
tokenizer trained on a few sentences."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "the cat sat on a mat and a dog ran to the big red ball while birds sang songs of summer".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(bert: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|end|>", "<pad>", "[CLS]", "[SEP]", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4 + ["count: one two three four five six"], trainer)
    kw = dict(eos_token="<|end|>", pad_token="<pad>")
    if bert:
        kw.update(cls_token="[CLS]", sep_token="[SEP]")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    out.chat_template = CHAT_TEMPLATE
    return out


def save_llama(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_gpt2(folder: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tok = _tokenizer(bert=True)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def lm_rows(n: int = 36, clients: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        a = WORDS[i % len(WORDS)]
        b = WORDS[(3 * i + 1) % len(WORDS)]
        rows.append({"prompt": f"the {a} and", "completion": f" a {b} {a}", "client": f"c{i % clients}",
                     "text": f"the {a} sat on {b}"})  # fmt: skip
    return rows


def cls_rows(n: int = 60) -> list[dict]:
    rows = []
    for i in range(n):
        label = ["pets", "toys", "sky"][i % 3]
        word = {"pets": "cat dog", "toys": "ball red", "sky": "birds summer"}[label]
        rows.append({"text": f"{word} the {WORDS[i % len(WORDS)]}", "label": label, "client": f"c{i % 2}"})
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    """rows as JSONL, CSV or parquet by the suffix of `path`."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import datasets

        table = datasets.Dataset.from_list(rows)
        (table.to_csv if path.suffix == ".csv" else table.to_parquet)(str(path))
    return path
