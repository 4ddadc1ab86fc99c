"""Streaming aggregation: the server folds each accepted upload in and lets it go.

`Algorithm.aggregator(global_state, num_samples, info, memory)` returns an `Aggregator`; the
runtime decodes one upload at a time, calls `add(upload)` in the order of `num_samples`, then
`finish()` for (broadcast, new server memory). Memory is then the global state plus the
aggregator's accumulators plus one decoded upload, never m decoded copies.

* `Collecting` keeps the uploads and runs a batch step at the end: the default, and what the
  exact FedSRD / FlexLoRA steps use (their factored SVD needs every client's factors at once).
* `WeightedMeans`: per-key weighted means, the same additions in the same order as
  `base.weighted_mean`, so streaming FedAvg equals the batch mean bit for bit.
* `ModuleSketches`: one `fedlowrank.sketch.ProductSketch` per LoRA module (plus weighted means
  of the other keys): the streaming FedSRD / FlexLoRA server steps.
* `aggregate_encoded`: how the runtime feeds uploads it keeps encoded, decoding each into
  reused buffers when the aggregator lets uploads go (`Aggregator.keeps_uploads`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from fedlowrank.codec import DecodeBuffers
from fedlowrank.lora import lora_pairs
from fedlowrank.payload import Payload
from fedlowrank.seeds import derive_seed
from fedlowrank.sketch import ProductSketch

__all__ = ["Aggregator", "Collecting", "WeightedMeans", "ModuleSketches", "aggregate", "aggregate_encoded", "use_sketch"]

# `method = "auto"` keeps the exact step while it is cheap anyway: its QR work
# sum over modules (d_out + d_in) min(m r, d_out, d_in)^2 (multiply-adds) and the m decoded
# uploads it holds stay under these
EXACT_WORK = 2**34  # about 1.7e10: a few seconds on 2 cores
EXACT_BYTES = 2**30

State = dict[str, torch.Tensor]


class Aggregator(ABC):
    """One round's server step, fed one upload at a time.

    `keeps_uploads`: whether `add` may hold on to the upload's tensors after it returns. An
    aggregator that folds each upload into its own sums says False, and the runtime then decodes
    every upload into the same reused buffers (`codec.DecodeBuffers`), which saves the page
    faults of a fresh dense copy per upload.
    """

    keeps_uploads: bool = True

    @abstractmethod
    def add(self, upload: Payload) -> None:
        """Fold in the next upload (in the order of the round's sample counts)."""

    @abstractmethod
    def finish(self) -> tuple[Payload, State]:
        """The broadcast and the server's new memory."""


def aggregate(aggregator: Aggregator, uploads: Iterable[Payload]) -> tuple[Payload, State]:
    """Feed `uploads` to `aggregator` in order and finish it. With a generator of decoded uploads,
    only one is alive at a time (each is let go before the next is produced)."""
    for u in uploads:
        aggregator.add(u)
        del u
    return aggregator.finish()


def aggregate_encoded(
    aggregator: Aggregator, encoded: Iterable[Any], decode: Callable[[Any, DecodeBuffers | None], Payload]
) -> tuple[Payload, State]:
    """`aggregate` over uploads kept encoded: `decode(item, buffers)` turns each into a Payload
    just before it is folded in. An aggregator that lets uploads go (`keeps_uploads = False`)
    gets them all decoded into one set of reused `DecodeBuffers`, let go before `finish` (the
    step's own peak); one that keeps them gets fresh tensors."""
    buffers = None if aggregator.keeps_uploads else DecodeBuffers()
    for item in encoded:
        aggregator.add(decode(item, buffers))
    del buffers
    return aggregator.finish()


def use_sketch(method: str, global_state: Mapping[str, torch.Tensor], sent: Sequence[str], clients: int,
               sketch_above: int) -> bool:  # fmt: skip
    """Whether a FedSRD / FlexLoRA round runs the streaming sketch: `method = "sketch"`, or
    "auto" with clients x rank above `sketch_above` *and* an exact step that would not be cheap
    (EXACT_WORK, EXACT_BYTES): small modules (MiniLM's 384 x 384, say) keep the exact step at any m."""
    if method != "auto":
        return method == "sketch"
    pairs = lora_pairs({k: global_state[k] for k in sent})
    rank = max((global_state[b].shape[1] for b, _ in pairs.values()), default=0)
    if clients * rank <= sketch_above:
        return False
    work = 0
    for b_key, a_key in pairs.values():
        (d_out, r), d_in = global_state[b_key].shape, global_state[a_key].shape[1]
        work += (d_out + d_in) * min(clients * r, d_out, d_in) ** 2
    held = clients * sum(global_state[k].numel() * global_state[k].element_size() for k in sent)
    return work > EXACT_WORK or held > EXACT_BYTES


class Collecting(Aggregator):
    """Keeps every upload and calls `step(uploads)` at the end (a batch server step)."""

    def __init__(self, step: Callable[[list[Payload]], tuple[Payload, State]]) -> None:
        self.step = step
        self.uploads: list[Payload] = []

    def add(self, upload: Payload) -> None:
        self.uploads.append(upload)

    def finish(self) -> tuple[Payload, State]:
        return self.step(self.uploads)


class WeightedMeans:
    """sum_j w_j * upload_j[key] for each key, accumulated in the global state's dtype."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], keys: Sequence[str], weights: Sequence[float]) -> None:
        self.weights = [float(w) for w in weights]
        self.sums = {k: torch.zeros_like(global_state[k]) for k in keys}
        self.count = 0

    def add(self, upload: Payload) -> float:
        """Fold `upload` in; returns its weight."""
        if self.count >= len(self.weights):
            raise ValueError(f"more uploads than the {len(self.weights)} sample counts given")
        w = self.weights[self.count]
        for k, acc in self.sums.items():
            acc.add_(upload.tensors[k].to(acc.dtype), alpha=w)
        self.count += 1
        return w

    def check_complete(self) -> None:
        if self.count != len(self.weights):
            raise ValueError(f"got {self.count} uploads for {len(self.weights)} sample counts")


class ModuleSketches:
    """A `ProductSketch` per LoRA module of `keys` (in `work` dtype, its random matrices seeded by
    (run seed, "sketch", round, module), so a round repeats exactly; `width` and `sides` as
    there) and weighted means of the other keys."""

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        keys: Sequence[str],
        weights: Sequence[float],
        seed: int,
        round: int,
        work: Callable[[torch.Tensor], torch.dtype],
        width: int,
        sides: str = "both",
    ) -> None:
        self.pairs = lora_pairs({k: global_state[k] for k in keys})
        in_pairs = {k for pair in self.pairs.values() for k in pair}
        self.means = WeightedMeans(global_state, [k for k in keys if k not in in_pairs], weights)
        self.sketches: dict[str, ProductSketch] = {}
        for module, (b_key, a_key) in self.pairs.items():
            B, A = global_state[b_key], global_state[a_key]
            dt = work(B)
            self.sketches[module] = ProductSketch(B.to(dt), A.to(dt), derive_seed(seed, "sketch", round, module), width=width,
                                                  sides=sides)  # fmt: skip

    def add(self, upload: Payload) -> None:
        w = self.means.add(upload)
        for module, (b_key, a_key) in self.pairs.items():
            sk = self.sketches[module]
            dt = sk.B.dtype
            sk.add(upload.tensors[b_key].to(dt), upload.tensors[a_key].to(dt), w)

    def check_complete(self) -> None:
        self.means.check_complete()
