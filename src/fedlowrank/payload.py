"""What crosses the wire: named tensors plus a few scalar fields.

A `Payload` is what a client uploads or the server broadcasts, before encoding. Sparse tensors
are ordinary dense tensors holding zeros; the codec (`fedlowrank.codec`) sends only their
non-zeros. A tensor listed in `seeds` has positions given by
`fedlowrank.sparsify.seeded_keep_mask(shape, keep_prob, seed)`: the codec sends its values at
exactly those positions (zeros included) and no positions at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MetaValue = int | float | str


@dataclass
class Payload:
    tensors: dict[str, torch.Tensor]
    # name -> (seed, keep_prob): positions regenerated from the seed, never sent
    seeds: dict[str, tuple[int, float]] = field(default_factory=dict)
    # small scalar fields, e.g. {"round": 3, "kind": "delta"}
    meta: dict[str, MetaValue] = field(default_factory=dict)
    # diagnostics of whoever built the payload (energy kept by a mask, factor norms): never
    # encoded, so a decoded payload has none; the runtimes copy them into the round records
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.seeds) - set(self.tensors)
        if unknown:
            raise ValueError(f"Payload: seeds name tensors that are not in the payload: {sorted(unknown)}")
