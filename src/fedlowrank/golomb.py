"""Golomb-Rice coding of a sorted set of flat indices, vectorised with numpy.

A k-of-n index set idx_0 < idx_1 < ... < idx_{k-1} becomes k gaps g_i = idx_i - idx_{i-1} - 1
(with idx_{-1} = -1), each >= 0. With Rice parameter b, gap g costs b remainder bits (g mod 2^b,
most significant bit first) plus a unary quotient q = g >> b written as q zero bits and a one.
For a uniformly random support the gaps are close to geometric with p = k/n, the textbook case
for Golomb codes: the best Rice parameter spends at most ~3.3% more bits than
log2 C(n, k) at any density between 1% and 30% (worst near 21%; see docs/wire.md).

Stream layout (so that decoding needs no per-entry loop): first all k remainders back to back
(k*b bits), then all k unary quotients back to back, then zero padding to a whole byte. Bits are
packed least significant bit first within each byte (numpy `bitorder="little"`). Because every
quotient ends with a one, the quotients are read back with one `np.flatnonzero`, and the
remainders with one reshape.

Functions here raise plain ValueError; `fedlowrank.codec` turns them into PayloadError.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_RICE_PARAMETER", "rice_cost_bits", "choose_rice_parameter", "rice_encode", "rice_decode"]

MAX_RICE_PARAMETER = 62  # keeps (q << b) | r inside int64 once q <= (n - 1) >> b is checked


def _gaps(indices: np.ndarray) -> np.ndarray:
    """Gaps between successive strictly increasing indices (first one measured from -1)."""
    return np.diff(indices.astype(np.int64, copy=False), prepend=np.int64(-1)) - 1


def rice_cost_bits(gaps: np.ndarray, b: int) -> int:
    """Exact stream length in bits (before byte padding) of `gaps` at Rice parameter b."""
    return int(gaps.size) * (b + 1) + int(np.sum(gaps >> b, dtype=np.int64))


def choose_rice_parameter(gaps: np.ndarray, n: int) -> int:
    """The cheapest Rice parameter for these gaps.

    The geometric-gap optimum lies near log2(ln 2 * mean gap); the exact cost of the parameters
    around it is evaluated on the actual gaps (three vectorised passes), so clustered supports
    such as importance masks get their own best parameter too.
    """
    k = int(gaps.size)
    if k == 0:
        return 0
    mean_gap = (n - k) / k
    centre = int(round(math.log2(max(mean_gap * math.log(2.0), 1.0))))
    candidates = range(max(0, centre - 1), min(MAX_RICE_PARAMETER, centre + 1) + 1)
    return min(candidates, key=lambda b: (rice_cost_bits(gaps, b), b))


def rice_encode(indices: np.ndarray, n: int) -> tuple[int, bytes]:
    """Encode strictly increasing indices in [0, n). Returns (rice parameter, stream bytes)."""
    gaps = _gaps(indices)
    k = int(gaps.size)
    if k == 0:
        return 0, b""
    if int(gaps.min()) < 0 or int(indices[-1]) >= n:
        raise ValueError("rice_encode: indices must be strictly increasing and lie in [0, n)")
    b = choose_rice_parameter(gaps, n)
    q = gaps >> b  # (k,)
    remainders = np.empty((k, b), dtype=np.uint8)  # (k, b), MSB first
    for j in range(b):
        remainders[:, j] = (gaps >> (b - 1 - j)) & 1
    unary = np.zeros(int(q.sum()) + k, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1  # q zeros, then the terminating one
    bits = np.concatenate([remainders.reshape(-1), unary])
    return b, np.packbits(bits, bitorder="little").tobytes()


def rice_decode(stream: bytes, k: int, b: int, n: int) -> np.ndarray:
    """Decode k strictly increasing int64 indices in [0, n) from a Rice stream.

    Raises ValueError unless the stream holds exactly k positions, every one below n, followed
    only by zero padding inside the last byte.
    """
    if k == 0:
        if stream:
            raise ValueError(f"golomb stream has {len(stream)} bytes but k = 0")
        return np.zeros(0, dtype=np.int64)
    if b > MAX_RICE_PARAMETER:
        raise ValueError(f"golomb rice parameter {b} above the maximum {MAX_RICE_PARAMETER}")
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="little")
    n_rem = k * b
    if bits.size < n_rem + k:
        raise ValueError(
            f"golomb stream too short: {len(stream)} bytes cannot hold {k} positions at rice parameter {b}"
        )
    rem_bits = bits[:n_rem].reshape(k, b)
    # the remainders, most significant bit first; in bytes while they fit (fewer bytes to move)
    r = np.zeros(k, dtype=np.uint8 if b <= 8 else np.int64)
    for j in range(b):
        r <<= 1
        r |= rem_bits[:, j]
    r = r.astype(np.int64, copy=False)
    # unpackbits gives 0/1 bytes: as booleans, numpy's nonzero takes its fast path (8x here)
    ones = np.flatnonzero(bits[n_rem:].view(np.bool_))
    if ones.size < k:
        raise ValueError(f"golomb stream holds {ones.size} positions, fewer than k = {k}")
    end_bits = n_rem + int(ones[k - 1]) + 1
    if (end_bits + 7) // 8 != len(stream):
        raise ValueError(
            f"golomb stream is {len(stream)} bytes but its {k} positions end within {(end_bits + 7) // 8}"
        )
    if ones.size > k:
        raise ValueError(f"golomb stream holds more than k = {k} positions (non-zero padding bits)")
    q = np.diff(ones[:k], prepend=np.int64(-1)) - 1
    if int(q.max()) > (n - 1) >> b:
        raise ValueError(f"golomb index past n = {n}")
    gaps = (q << b) | r
    # cheap overflow guard before the exact int64 cumulative sum
    if float(np.sum(gaps, dtype=np.float64)) + k > n * (1.0 + 1e-6) + 1.0:
        raise ValueError(f"golomb index past n = {n}")
    indices = np.cumsum(gaps + 1) - 1
    if int(indices[-1]) >= n:
        raise ValueError(f"golomb index {int(indices[-1])} past n = {n}")
    return indices
