"""Seeds derived from names: the one source of randomness every layer shares (tasks, data,
algorithms, runtimes), so it lives below all of them."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, purpose, round, tensor name): stable everywhere."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
