"""The task interface: a model, federated data, a local training loop and an evaluation.

A task knows nothing of algorithms beyond the hooks of `fedlowrank.algorithms.base.Algorithm`.
The federated *state* of a task is a flat `{key: tensor}` dict over the parameters that can
train (a LoRA adapter plus a head, or a whole small model); `parameters()` maps each key to the
model's `nn.Parameter`. The runtime keeps one model in the process and swaps states in and out:

    task.load(state)                               # copy values into the model
    stats = task.train(client, trainable, extra_loss, seed)   # local steps in place
    trained = task.state()                         # read them back

Subclasses implement `_build`, `client_batches`, `batch_loss` and `evaluate_batches`; the
optimizer loop, the seeding and the accuracy bookkeeping live here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from fedlowrank.seeds import derive_seed
from fedlowrank.config import ConfigError, choice, require

__all__ = [
    "Task",
    "PartitionedTask",
    "TrainConfig",
    "PartitionConfig",
    "partition_labels",
    "split_like",
    "batches",
    "stratified_sample",
]

State = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one client in one round."""

    local_steps: int = 10  # optimizer steps per client per round
    # training examples per optimizer step
    batch_size: int = 16
    # the local optimizer's learning rate
    lr: float = 1e-3
    # "adamw" (state reset every round) or "sgd" (with `momentum`)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    momentum: float = 0.0  # sgd only
    # the local optimizer's weight decay
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping
    # examples per evaluation batch (memory only; results do not depend on it)
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        require(1 <= self.local_steps <= 1_000_000, "local_steps", f"must lie in [1, 1000000], got {self.local_steps}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        require(0.0 < self.lr <= 10.0, "lr", f"must lie in (0, 10], got {self.lr}")
        require(0.0 <= self.momentum < 1.0, "momentum", f"must lie in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.max_grad_norm >= 0.0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class PartitionConfig:
    """How samples are dealt to clients.

    * `dirichlet`: for each class, shares q ~ Dir(alpha * 1) over the clients (Hsu et al. 2019);
      small alpha = skewed labels, large alpha = nearly IID.
    * `labels`: each client holds `labels_per_client` classes (client i: classes i, i+1, ...
      modulo the class count), each class split evenly among its holders.
    * `iid`: a random permutation dealt out evenly, every client within one sample of every
      other (so even 1,000 clients of a small data set each get at least one when there are as
      many samples).
    """

    # clients the data is dealt to, in [1, 100000]
    num_clients: int = 10
    # "dirichlet": label skew Dir(alpha) (Hsu et al. 2019); "labels": labels_per_client classes each; "iid": an even random deal
    partition: Literal["dirichlet", "labels", "iid"] = "dirichlet"
    # Dirichlet concentration in (0, 1e6]: small = skewed labels, large = nearly IID
    alpha: float = 0.5
    # "labels" partition: classes per client (client i holds i, i+1, ... modulo the classes)
    labels_per_client: int = 2
    min_samples: int = 8  # dirichlet: redraw until every client has at least this many

    def __post_init__(self) -> None:
        require(1 <= self.num_clients <= 100_000, "num_clients", f"must lie in [1, 100000], got {self.num_clients}")
        choice(self.partition, "partition", ("dirichlet", "labels", "iid"))
        require(0.0 < self.alpha <= 1e6, "alpha", f"must lie in (0, 1e6], got {self.alpha}")
        require(self.labels_per_client >= 1, "labels_per_client", f"must be >= 1, got {self.labels_per_client}")
        require(self.min_samples >= 0, "min_samples", f"must be >= 0, got {self.min_samples}")


def _label_shares(labels: np.ndarray, num_classes: int, cfg: PartitionConfig, rng: np.random.Generator) -> np.ndarray:
    """(num_classes, num_clients) share of each class that goes to each client; rows sum to 1."""
    m = cfg.num_clients
    if cfg.partition == "labels":
        if cfg.labels_per_client > num_classes:
            raise ConfigError(
                f"task.labels_per_client: {cfg.labels_per_client} exceeds the {num_classes} classes of the task"
            )
        held = np.zeros((num_classes, m))
        for i in range(m):
            for j in range(cfg.labels_per_client):
                held[(i + j) % num_classes, i] = 1.0
        empty = np.flatnonzero(held.sum(axis=1) == 0)
        if empty.size:
            raise ConfigError(
                f"task.labels_per_client: with {m} clients and labels_per_client = {cfg.labels_per_client}, classes {empty.tolist()} "
                "have no client; use more clients or more labels per client"
            )
        return held / held.sum(axis=1, keepdims=True)
    counts = np.bincount(labels, minlength=num_classes)
    for _ in range(1000):
        shares = rng.dirichlet(np.full(m, cfg.alpha), size=num_classes)  # (classes, clients)
        sizes = sum(np.diff(_cuts(shares[c], counts[c]), prepend=0, append=counts[c]) for c in range(num_classes))
        if sizes.min() >= cfg.min_samples:
            return shares
    raise ConfigError(
        f"task.min_samples: dirichlet(alpha = {cfg.alpha}) gave some client fewer than min_samples = {cfg.min_samples} "
        f"samples in 1000 draws; raise alpha, lower min_samples, use fewer clients or partition = \"iid\""
    )


def _cuts(share: np.ndarray, n: int) -> np.ndarray:
    """Where n samples of one class are cut between clients with these shares (m - 1 cuts)."""
    return (np.cumsum(share) * n).round().astype(int)[:-1]


def split_like(labels: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal the indices of `labels` to clients by per-class shares (classes x clients)."""
    num_classes, m = shares.shape
    out: list[list[np.ndarray]] = [[] for _ in range(m)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for i, part in enumerate(np.split(idx, _cuts(shares[c], idx.size))):
            out[i].append(part)
    return [np.sort(np.concatenate(parts)) for parts in out]


def partition_labels(
    labels: np.ndarray, num_classes: int, cfg: PartitionConfig, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Client index sets of `labels` and the class shares used (to split a test set alike)."""
    rng = np.random.default_rng(derive_seed(seed, "partition"))
    if cfg.partition == "iid":
        m = cfg.num_clients
        parts = [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), m)]
        return parts, np.full((num_classes, m), 1.0 / m)
    shares = _label_shares(np.asarray(labels), num_classes, cfg, rng)
    return split_like(np.asarray(labels), shares, rng), shares


def stratified_sample(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly `count` sorted indices of `labels`, classes in proportion (largest remainders)."""
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / sizes.sum()
    take = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - take), kind="stable")[: count - take.sum()]:
        take[j] += 1
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=False)]
    return np.sort(np.concatenate(picks))


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batch indices over range(n): one permutation per epoch."""
    if n <= 0:
        raise ValueError("a client without samples cannot train")
    while True:
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n, batch_size):
            yield perm[s : s + batch_size]


class Task(ABC):
    """Base class: a model with a federated state, client data, local training, evaluation."""

    name: ClassVar[str]
    Config: ClassVar[type]
    num_classes: int
    default_threads: ClassVar[int] = 0  # torch threads for a run (0: torch's default); tiny models: 1

    def __init__(self, config: Any, seed: int = 0) -> None:
        self.config = config
        self.seed = int(seed)
        self._built = False
        self.model: nn.Module | None = None

    # --- building ---------------------------------------------------------------------------
    def build(self) -> "Task":
        """Load data and build the model (once). The model's initial values come from the seed."""
        if not self._built:
            torch.manual_seed(derive_seed(self.seed, "model", self.name))
            self._build()
            self._params = self.parameters()
            self._initial = self.state()
            self._built = True
        return self

    @abstractmethod
    def _build(self) -> None:
        """Set self.model, the client partitions and the test data."""

    @abstractmethod
    def parameters(self) -> dict[str, nn.Parameter]:
        """State key -> the model's parameter, for every parameter that may train."""

    @property
    @abstractmethod
    def num_clients(self) -> int: ...

    @abstractmethod
    def num_samples(self, client: int) -> int:
        """Training samples held by `client` (for sample-weighted aggregation)."""

    @abstractmethod
    def client_batches(self, client: int, generator: torch.Generator) -> Iterator[Batch]:
        """Endless training batches of `client`."""

    @abstractmethod
    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, logits) of the model on a batch, in the model's current mode."""

    @abstractmethod
    def evaluate_batches(self, client: int | None) -> Iterator[Batch]:
        """Test batches: the held-out global test set (client None) or a client's own split."""

    def has_client_tests(self) -> bool:
        """Whether `evaluate_batches(client)` exists (personalised evaluation)."""
        return False

    def local_keys(self) -> list[str]:
        """Keys the *model* keeps on each client whatever the algorithm (pFedPara's W2 factors)."""
        return []

    # --- state ------------------------------------------------------------------------------
    def initial_state(self) -> State:
        return {k: v.clone() for k, v in self._initial.items()}

    def state(self) -> State:
        return {k: p.detach().clone() for k, p in self.parameters().items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        params = self._params
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    # --- training and evaluation ------------------------------------------------------------
    def train(
        self,
        client: int,
        trainable: Sequence[str],
        extra_loss: Callable[[Mapping[str, torch.Tensor]], torch.Tensor | None] | None,
        seed: int,
    ) -> dict[str, float]:
        """`local_steps` optimizer steps on `client`'s data, in place on the loaded state.

        Only `trainable` keys get gradients; `extra_loss(params)` (FedProx) is added to the
        loss. Every random draw (batches, dropout) comes from `seed`.
        """
        cfg: TrainConfig = self.config
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        gen = torch.Generator().manual_seed(seed)
        params = self._params
        train_set = set(trainable)
        for k, p in params.items():
            p.requires_grad_(k in train_set)
        chosen = {k: params[k] for k in params if k in train_set}
        if not chosen:
            return {"loss": float("nan"), "steps": 0}
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(chosen.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(chosen.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model.train()
        total, steps = 0.0, 0
        data = self.client_batches(client, gen)
        for _ in range(cfg.local_steps):
            loss, _ = self.batch_loss(next(data))
            if extra_loss is not None:
                extra = extra_loss(chosen)
                if extra is not None:
                    loss = loss + extra
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {client}: non-finite training loss {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(chosen.values(), cfg.max_grad_norm)
            opt.step()
            total += float(loss.detach())
            steps += 1
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        return {"loss": total / steps, "steps": steps}

    @torch.no_grad()
    def evaluate(self, client: int | None = None) -> dict[str, float]:
        """Accuracy and mean loss of the loaded state on a test set."""
        self.model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        for batch in self.evaluate_batches(client):
            loss, logits = self.batch_loss(batch)
            y = batch[1]
            correct += int((logits.argmax(dim=-1) == y).sum())
            loss_sum += float(loss) * y.numel()
            n += y.numel()
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0}
        return {"accuracy": correct / n, "loss": loss_sum / n, "samples": n}


class PartitionedTask(Task):
    """A task whose clients hold index arrays `self.parts[i]` into one training set, with
    `config.num_clients` clients and batches of `config.batch_size` (digits, news-topics, fashion)."""

    parts: list[np.ndarray]

    @property
    def num_clients(self) -> int:
        return self.config.num_clients

    def num_samples(self, client: int) -> int:
        return int(self.parts[client].size)

    def client_indices(self, client: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Endless batches of `client`'s training-set indices, shuffled by `generator`."""
        idx = torch.from_numpy(self.parts[client])
        for b in batches(idx.numel(), self.config.batch_size, generator):
            yield idx[b]

