"""`shakespeare`: LEAF next-character prediction, one client per speaking role.

Data (fedlowrank.data.shakespeare): Shakespeare's 37 plays from the `shakespeare` package. Every
(play, role) with at least `min_speeches` speeches is a client (LEAF, Caldas et al. 2018); its
text is its speeches joined by newlines. The first 1 - `test_fraction` of each client's text is
its training text, the rest its test text (a split in time, so no test window overlaps a
training window). A sample is a window of `seq_len` characters and the character after it
(`target = "next"`, as LEAF), or the same window shifted by one (`target = "all"`: every
position is a label, 80 times the signal per window, an option for CPU budgets).

The global test set is `eval_windows` evenly spaced windows from each client's test text; a
client's own windows are its personal test split.

Model: embedding (97 characters -> `embed_dim` = 8), a `num_layers` = 2 LSTM with `hidden` = 256
units and a linear head, the LEAF / FedAvg reference network, in three forms:

* `plain`: `nn.LSTM`;
* `fedpara`: `fedlowrank.fedpara.FedParaLSTM`, each input and recurrent matrix a FedPara
  Hadamard product with its inner rank from `gamma` (Hyeon-Woo et al., ICLR 2022);
* `lowrank`: the same class with `low_rank=True`, a conventional low-rank LSTM of the same
  parameter budget (rank 2R).

The embedding and the head stay dense in every form. The state is every parameter (FedAvg-style
algorithms send the whole model; with FedPara that is the factors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.seeds import derive_seed
from fedlowrank.config import choice, require
from fedlowrank.data.shakespeare import VOCAB_SIZE, encode, role_texts
from fedlowrank.tasks.base import Batch, Task, TrainConfig, batches

__all__ = ["ShakespeareTask", "ShakespeareConfig", "CharLSTM"]


@dataclass(frozen=True)
class ShakespeareConfig(TrainConfig):
    # "plain" LSTM, "fedpara" (Hadamard low-rank LSTM matrices) or "lowrank"
    model: Literal["plain", "fedpara", "lowrank"] = "plain"
    gamma: float = 0.1  # FedPara rank rule, per matrix (fedpara and lowrank)
    # character embedding width
    embed_dim: int = 8
    # LSTM hidden width
    hidden: int = 256
    # stacked LSTM layers
    num_layers: int = 2
    # characters per training window
    seq_len: int = 80
    # "next": predict the character after each window; "all": every position
    target: Literal["next", "all"] = "next"
    min_speeches: int = 64  # a role needs this many speeches to be a client
    max_clients: int = 0  # 0: every such role; else a seeded sample of this many
    test_fraction: float = 0.2  # tail of each client's text
    eval_windows: int = 64  # test windows per client (evenly spaced); 0: every window
    local_steps: int = 20
    batch_size: int = 10
    lr: float = 1.0
    optimizer: Literal["sgd", "adamw"] = "sgd"
    max_grad_norm: float = 5.0
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        choice(self.model, "model", ("plain", "fedpara", "lowrank"))
        choice(self.target, "target", ("next", "all"))
        require(0.0 <= self.gamma <= 1.0, "gamma", f"must lie in [0, 1], got {self.gamma}")
        require(1 <= self.embed_dim <= 1024, "embed_dim", f"must lie in [1, 1024], got {self.embed_dim}")
        require(1 <= self.hidden <= 4096, "hidden", f"must lie in [1, 4096], got {self.hidden}")
        require(1 <= self.num_layers <= 8, "num_layers", f"must lie in [1, 8], got {self.num_layers}")
        require(1 <= self.seq_len <= 1000, "seq_len", f"must lie in [1, 1000], got {self.seq_len}")
        require(self.min_speeches >= 1, "min_speeches", f"must be >= 1, got {self.min_speeches}")
        require(self.max_clients >= 0, "max_clients", f"must be >= 0, got {self.max_clients}")
        require(0.0 < self.test_fraction < 1.0, "test_fraction", f"must lie in (0, 1), got {self.test_fraction}")
        require(self.eval_windows >= 0, "eval_windows", f"must be >= 0, got {self.eval_windows}")


class CharLSTM(nn.Module):
    """(N, L) character ids -> (N, L, hidden) LSTM outputs; `head` maps them to logits."""

    def __init__(self, vocab: int, embed_dim: int, hidden: int, num_layers: int, kind: str, gamma: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        if kind == "plain":
            self.lstm = nn.LSTM(embed_dim, hidden, num_layers, batch_first=True)
        else:
            from fedlowrank.fedpara import FedParaLSTM

            self.lstm = FedParaLSTM(
                embed_dim, hidden, num_layers, batch_first=True, gamma=gamma, low_rank=kind == "lowrank"
            )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))  # (N, L, hidden)
        return out


class ShakespeareTask(Task):
    name = "shakespeare"
    Config = ShakespeareConfig
    num_classes = VOCAB_SIZE

    def _build(self) -> None:
        cfg: ShakespeareConfig = self.config
        L = cfg.seq_len
        texts = role_texts(min_speeches=cfg.min_speeches)
        # Both parts of a client's text must hold at least one window and its label.
        def fits(n: int) -> bool:
            cut = _cut(n, cfg.test_fraction)
            return min(cut, n - cut) > L

        names = [k for k, t in texts.items() if fits(len(t))]
        if cfg.max_clients and cfg.max_clients < len(names):
            rng = np.random.default_rng(derive_seed(self.seed, "shakespeare-clients"))
            names = [names[i] for i in sorted(rng.choice(len(names), cfg.max_clients, replace=False))]
        if not names:
            raise ValueError(f"no role has enough text for seq_len = {L} with min_speeches = {cfg.min_speeches}")
        self.client_names = names
        self.train_text: list[torch.Tensor] = []
        test_x, test_y, self.test_slices = [], [], []
        for name in names:
            ids = torch.from_numpy(encode(texts[name]).astype(np.int64))
            cut = _cut(ids.numel(), cfg.test_fraction)
            self.train_text.append(ids[:cut])
            test = ids[cut:]
            n = test.numel() - L  # windows whose label lies inside the test text
            starts = torch.arange(n) if not cfg.eval_windows or cfg.eval_windows >= n else (
                torch.linspace(0, n - 1, cfg.eval_windows).round().long()
            )  # fmt: skip
            x, y = self._windows(test, starts)
            x, y = x.to(torch.uint8), y.to(torch.uint8)  # 8x less memory; widened per batch
            first = sum(t.shape[0] for t in test_x)
            self.test_slices.append(slice(first, first + x.shape[0]))
            test_x.append(x)
            test_y.append(y)
        self.X_test, self.y_test = torch.cat(test_x), torch.cat(test_y)
        self.model = CharLSTM(VOCAB_SIZE, cfg.embed_dim, cfg.hidden, cfg.num_layers, cfg.model, cfg.gamma)

    def _windows(self, text: torch.Tensor, starts: torch.Tensor) -> Batch:
        """Inputs (N, L) and labels: (N,) the next character, or (N, L) every next character."""
        L = self.config.seq_len
        idx = starts[:, None] + torch.arange(L + 1)  # (N, L + 1)
        win = text[idx]
        x = win[:, :L]
        return (x, win[:, L]) if self.config.target == "next" else (x, win[:, 1:])

    def describe(self) -> dict[str, Any]:
        """Clients, characters and parameter counts, for logs and docs."""
        return {
            "clients": len(self.client_names),
            "train_chars": int(sum(t.numel() for t in self.train_text)),
            "test_windows": int(self.X_test.shape[0]),
            "parameters": int(sum(p.numel() for p in self.model.parameters())),
            "lstm_parameters": int(sum(p.numel() for p in self.model.lstm.parameters())),
        }

    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    @property
    def num_clients(self) -> int:
        return len(self.client_names)

    def num_samples(self, client: int) -> int:
        return int(self.train_text[client].numel() - self.config.seq_len)

    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        text = self.train_text[client]
        for b in batches(self.num_samples(client), self.config.batch_size, generator):
            yield self._windows(text, b)

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        out = self.model(x)  # (N, L, hidden)
        if self.config.target == "next":
            logits = self.model.head(out[:, -1])  # (N, V)
            return F.cross_entropy(logits, y), logits
        logits = self.model.head(out)  # (N, L, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits

    def has_client_tests(self) -> bool:
        return True

    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        sel = slice(None) if client is None else self.test_slices[client]
        X, y = self.X_test[sel], self.y_test[sel]
        bs = self.config.eval_batch_size
        for s in range(0, X.shape[0], bs):
            yield X[s : s + bs].long(), y[s : s + bs].long()


def _cut(n: int, test_fraction: float) -> int:
    """Length of the training part of a text of n characters."""
    return int(round(n * (1.0 - test_fraction)))
