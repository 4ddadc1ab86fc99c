"""The wire format: payloads <-> bytes, exact sizes, information bound, validating decoder.

Every runtime sends what `encode_payload` returns and the ledger counts its `len`. The byte layout
is specified in docs/wire.md; in short:

    payload = b"FLRK" | version (1 byte) | meta count (varint) | meta entries (sorted by name)
              | tensor count (varint) | tensors (sorted by name) | CRC32 of all bytes before it
    meta    = name | type tag (1 byte) | value (zigzag varint, float64 LE, string, or bool byte)
    tensor  = name | record
    name    = byte length (varint) | UTF-8
    record  = tag (1 byte: positions << 2 | value dtype) | ndim (varint) | dims (varints)
              | encoding header | values (little-endian, flat C order) | positions

Positions (per tensor; "auto" picks the smaller of golomb and dense for each tensor):
    dense   every value, no positions                       header: -
    bitmap  n bits, LSB first within a byte                 header: k
    golomb  Golomb-Rice coded gaps (fedlowrank.golomb)     header: k, rice parameter, stream bytes
    seeded  values at seeded_keep_mask(shape, p, seed)      header: seed, keep_prob (float64), k

Values: fp32 (bit-exact), bf16 (round to nearest even) or fp16. Sparse encodings (bitmap, golomb)
send the entries that are non-zero *after* rounding to the value dtype, so decoding returns
exactly `t.to(dtype).float()` with every zero (including -0.0) as +0.0. Dense and seeded send
zeros as they are (a dense fp32 -0.0 comes back as -0.0).

The decoder checks everything a peer controls and raises PayloadError naming the problem (and
the tensor): truncation, trailing bytes, magic, version, checksum, unknown codes, shapes, counts,
index ranges, non-finite values and size limits. Nothing is allocated from a header before that
header has been checked against the limits and against the bytes actually present. What a short
input can still cause is bounded by max_elements: the output tensor itself (calloc'd, so pages
that receive no value cost no physical memory) and, for a seeded record, its regenerated mask.
Servers pass expected shapes, so nothing larger than the model's own tensors is allocated.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedlowrank.golomb import MAX_RICE_PARAMETER, rice_decode, rice_encode
from fedlowrank.payload import MetaValue, Payload
from fedlowrank.sparsify import seeded_keep_mask

__all__ = [
    "PayloadError",
    "DecodeBuffers",
    "MAGIC",
    "FORMAT_VERSION",
    "POSITION_ENCODINGS",
    "VALUE_DTYPES",
    "VALUE_BITS",
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_BYTES",
    "encode_tensor",
    "decode_tensor",
    "encode_payload",
    "encode_payload_with_stats",
    "decode_payload",
    "information_bound_bits",
    "payload_stats",
]

MAGIC = b"FLRK"
FORMAT_VERSION = 1
POSITION_ENCODINGS = {"dense": 0, "bitmap": 1, "golomb": 2, "seeded": 3}
VALUE_DTYPES = {"fp32": 0, "bf16": 1, "fp16": 2}
VALUE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}
_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_POSITION_NAMES = {code: name for name, code in POSITION_ENCODINGS.items()}
_DTYPE_NAMES = {code: name for name, code in VALUE_DTYPES.items()}

DEFAULT_MAX_ELEMENTS = 2**31  # per tensor, and per payload in total
DEFAULT_MAX_BYTES = 2**31  # whole payload
MAX_NDIM = 32
MAX_NAME_BYTES = 4096  # a tensor or meta name, and a meta string value
MAX_META = 256  # meta entries per payload
_META_INT, _META_FLOAT, _META_STR, _META_BOOL = 0, 1, 2, 3


class PayloadError(ValueError):
    """Bytes that do not decode to a valid tensor or payload. The message names the problem."""


# --------------------------------------------------------------------------------------------
# primitives: varints, reader


def _put_varint(out: bytearray, v: int) -> None:
    """Unsigned LEB128: 7 bits per byte, least significant group first, high bit = more."""
    if v < 0 or v >= 2**64:
        raise ValueError(f"varint out of range: {v}")
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _put_name(out: bytearray, name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"names must be str, got {type(name).__name__}")
    raw = name.encode("utf-8")  # raises UnicodeEncodeError (a ValueError) on lone surrogates
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"name {name[:40]!r}... is {len(raw)} bytes, above {MAX_NAME_BYTES}")
    _put_varint(out, len(raw))
    out += raw


class _Reader:
    """Bounds-checked cursor over bytes; every read says what it was reading when it fails."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise PayloadError(f"truncated: {what} needs {n} bytes, {self.left} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str) -> int:
        v, shift = 0, 0
        for i in range(10):
            if self.left < 1:
                raise PayloadError(f"truncated: varint {what} ends early")
            byte = self.data[self.pos]
            self.pos += 1
            v |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and i > 0:
                    raise PayloadError(f"overlong varint for {what}")
                if v >= 2**64:
                    raise PayloadError(f"varint {what} above 2^64")
                return v
            shift += 7
        raise PayloadError(f"varint {what} longer than 10 bytes")

    def f64(self, what: str) -> float:
        return struct.unpack("<d", self.take(8, what))[0]

    def name(self, what: str) -> str:
        size = self.varint(f"{what} length")
        if size > MAX_NAME_BYTES:
            raise PayloadError(f"{what} is {size} bytes, above {MAX_NAME_BYTES}")
        raw = self.take(size, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PayloadError(f"{what} is not valid UTF-8") from e


# --------------------------------------------------------------------------------------------
# values


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    """Validated contiguous float32 CPU copy-or-view of t."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {t.dtype}")
    if t.dim() > MAX_NDIM:
        raise ValueError(f"tensor has {t.dim()} dimensions, above {MAX_NDIM}")
    t32 = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not np.isfinite(t32.numpy()).all():  # numpy: single-threaded and ~10x faster than torch here
        raise ValueError("tensor holds non-finite values (NaN or inf, possibly after the cast to fp32)")
    return t32


def _wire_values(t32: torch.Tensor, value_dtype: str) -> np.ndarray:
    """Flat values as they go on the wire: float32, float16, or bfloat16 bit patterns (uint16).

    Rounding is torch's (round to nearest even), so decoding gives exactly t.to(dtype).float().
    Raises if a finite fp32 value overflows the value dtype.
    """
    flat = t32.reshape(-1)
    if value_dtype == "fp32":
        return flat.numpy()
    if value_dtype == "fp16":
        w = flat.to(torch.float16).numpy()
        overflow = not np.isfinite(w).all()
    else:
        w = flat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        overflow = bool(((w & 0x7F80) == 0x7F80).any())  # exponent all ones: inf
    if overflow:
        raise ValueError(f"a value overflows {value_dtype} (largest |value| {flat.abs().max().item():.6g})")
    return w


def _nonzero(w: np.ndarray) -> np.ndarray:
    """Flat indices of the non-zero wire values (-0.0 is zero), increasing, int64."""
    if w.dtype == np.uint16:  # bfloat16 bits: zero iff all but the sign bit are clear
        return np.flatnonzero(w & 0x7FFF)
    return np.flatnonzero(w)


def _value_bytes(w: np.ndarray) -> bytes:
    little = {np.dtype(np.float32): "<f4", np.dtype(np.float16): "<f2", np.dtype(np.uint16): "<u2"}[w.dtype]
    return w.astype(little, copy=False).tobytes()


def _read_values(r: _Reader, k: int, value_dtype: str, allow_zero: bool) -> np.ndarray:
    """k values as float32; rejects non-finite values, and zeros where positions were sent."""
    vb = VALUE_BITS[value_dtype] // 8
    raw = r.take(k * vb, f"{k} {value_dtype} values")
    if value_dtype == "fp32":
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif value_dtype == "fp16":
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:  # bf16: the upper half of a float32
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise PayloadError(f"non-finite value {values[i]} at value {i}")
    if not allow_zero and k and not values.all():
        i = int(np.flatnonzero(values == 0)[0])
        raise PayloadError(f"explicit zero at value {i} (sparse encodings send non-zeros only)")
    return values


# --------------------------------------------------------------------------------------------
# one tensor


def _check_value_dtype(value_dtype: str) -> None:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"unknown value_dtype {value_dtype!r}; choose from {sorted(VALUE_DTYPES)}")


def _check_encoding_args(positions: str, value_dtype: str) -> None:
    if positions not in POSITION_ENCODINGS and positions != "auto":
        raise ValueError(f"unknown positions {positions!r}; choose from {sorted(POSITION_ENCODINGS) + ['auto']}")
    _check_value_dtype(value_dtype)


def _encode_auto(t: torch.Tensor, value_dtype: str) -> tuple[bytes, int, int]:
    """The smaller of the golomb and dense records (golomb is never larger than bitmap)."""
    golomb = _encode_record(t, "golomb", value_dtype, None, None)
    n = golomb[1]
    if len(golomb[0]) <= n * (VALUE_BITS[value_dtype] // 8):
        return golomb
    dense = _encode_record(t, "dense", value_dtype, None, None)
    return dense if len(dense[0]) < len(golomb[0]) else golomb


def _encode_record(
    t: torch.Tensor, positions: str, value_dtype: str, seed: int | None, keep_prob: float | None
) -> tuple[bytes, int, int]:
    """One record. Returns (bytes, n, k): k counts the non-zeros in the value dtype, or for seeded
    positions the mask's kept entries (the k of the information bound)."""
    _check_encoding_args(positions, value_dtype)
    if (positions == "seeded") != (seed is not None) or (seed is None) != (keep_prob is None):
        raise ValueError("seed and keep_prob are given exactly when positions == 'seeded'")
    if positions == "auto":
        return _encode_auto(t, value_dtype)
    t32 = _as_fp32(t)
    shape = tuple(t32.shape)
    n = t32.numel()
    w = _wire_values(t32, value_dtype)  # (n,)

    out = bytearray([POSITION_ENCODINGS[positions] << 2 | VALUE_DTYPES[value_dtype]])
    _put_varint(out, len(shape))
    for d in shape:
        _put_varint(out, d)

    if positions == "dense":
        out += _value_bytes(w)
        return bytes(out), n, int(_nonzero(w).size)

    if positions == "seeded":
        keep_prob = float(keep_prob)
        mask = seeded_keep_mask(shape, keep_prob, int(seed)).reshape(-1).numpy()  # validates both
        if np.flatnonzero(t32.reshape(-1).numpy()[~mask]).size:
            raise ValueError("tensor has non-zeros outside its seeded keep mask; they would be lost")
        kept = w[mask]
        _put_varint(out, int(seed))
        out += struct.pack("<d", keep_prob)
        _put_varint(out, kept.size)
        out += _value_bytes(kept)
        return bytes(out), n, int(kept.size)

    idx = _nonzero(w)  # after rounding: a value that underflows to zero is not sent
    k = int(idx.size)
    _put_varint(out, k)
    if positions == "bitmap":
        bits = np.zeros(n, dtype=np.uint8)
        bits[idx] = 1
        out += _value_bytes(w[idx])
        out += np.packbits(bits, bitorder="little").tobytes()
    else:  # golomb
        b, stream = rice_encode(idx, n)
        out.append(b)
        _put_varint(out, len(stream))
        out += _value_bytes(w[idx])
        out += stream
    return bytes(out), n, k


def encode_tensor(
    t: torch.Tensor,
    positions: str = "golomb",
    value_dtype: str = "fp32",
    *,
    seed: int | None = None,
    keep_prob: float | None = None,
) -> bytes:
    """One tensor as a standalone record (no magic; versioned by the payload format).

    positions: "golomb" | "bitmap" | "dense" | "auto" (the smaller of golomb and dense), or
    "seeded" together with seed and keep_prob.
    Raises ValueError for a non-float tensor, non-finite values, a value that overflows the
    value dtype, or (seeded) non-zeros outside the seeded mask.
    """
    return _encode_record(t, positions, value_dtype, seed, keep_prob)[0]


@dataclass(frozen=True)
class _Limits:
    max_elements: int  # per tensor
    total_left: int  # what is left of the payload's max_total_elements


class DecodeBuffers:
    """Dense buffers that `decode_payload(..., buffers=)` fills in place of fresh zeroed arrays.

    Decoding a sparse record into a fresh array costs the kernel's page faults on every page the
    scattered values touch (benchmarks/server_scaling.py: 128 uploads of a 3B-shaped LoRA set,
    371 MiB each, decode in 30.3 s into fresh arrays, 17.2 s into reused ones, in one run). With buffers, each tensor name keeps
    one float32 array: the previous decode's positions are zeroed, the new values written.

    The tensors a decode returns are views of these buffers: **the next decode with the same
    buffers overwrites them**. Only for a consumer that is done with an upload before it asks for
    the next (a streaming aggregator, a validation pass); a record that fails to decode leaves
    its buffer as the last successful decode left it.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._written: dict[str, np.ndarray] = {}

    def scatter(self, name: str, n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The buffer for `name` (n float32 entries) holding `values` at `idx` and zeros elsewhere."""
        out = self._arrays.get(name)
        if out is None or out.size != n:
            out = self._arrays[name] = np.zeros(n, dtype=np.float32)
        else:
            out[self._written[name]] = 0.0
        out[idx] = values
        self._written[name] = idx
        return out


def _read_record(
    r: _Reader, expected_shape: tuple[int, ...] | None, limits: _Limits, buffer: Callable | None = None
) -> tuple[torch.Tensor, tuple[int, float] | None]:
    """One tensor record. `buffer(n, idx, values)`, when given, returns the dense array a sparse
    record is scattered into (DecodeBuffers); else a fresh zeroed one."""
    tag = r.u8("record tag")
    enc_code, dtype_code = tag >> 2, tag & 3
    if enc_code not in _POSITION_NAMES:
        raise PayloadError(f"unknown position encoding code {enc_code}")
    if dtype_code not in _DTYPE_NAMES:
        raise PayloadError(f"unknown value dtype code {dtype_code}")
    positions, value_dtype = _POSITION_NAMES[enc_code], _DTYPE_NAMES[dtype_code]

    ndim = r.varint("ndim")
    if ndim > MAX_NDIM:
        raise PayloadError(f"ndim {ndim} above {MAX_NDIM}")
    shape, n, span = [], 1, 1
    for i in range(ndim):
        d = r.varint(f"dimension {i}")
        n *= d  # Python int: no overflow; checked against the limits at every step
        span *= max(d, 1)  # a zero dimension must not hide huge others (numpy refuses such shapes)
        if d > limits.max_elements or span > limits.max_elements:
            raise PayloadError(f"shape declares more than max_elements = {limits.max_elements} elements")
        shape.append(d)
    shape = tuple(shape)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise PayloadError(f"shape {shape} differs from expected {tuple(expected_shape)}")
    if n > limits.total_left:
        raise PayloadError("payload declares more elements in total than max_total_elements allows")

    seed_info = None
    if positions == "dense":
        values = _read_values(r, n, value_dtype, allow_zero=True)
        return torch.from_numpy(values.reshape(shape)), None

    if positions == "seeded":
        seed = r.varint("seed")
        keep_prob = r.f64("keep_prob")
        if seed >= 2**63:
            raise PayloadError(f"seed {seed} above 2^63 - 1")
        if not 0.0 < keep_prob <= 1.0:  # also rejects NaN
            raise PayloadError(f"keep_prob {keep_prob} outside (0, 1]")
        seed_info = (seed, keep_prob)

    k = r.varint("count k")
    if k > n:
        raise PayloadError(f"count k = {k} exceeds n = {n}")
    if positions == "seeded":  # the mask keeps Binomial(n, p) entries: refuse an implausible k before building it
        mean = n * keep_prob
        if abs(k - mean) > 8.0 * math.sqrt(mean * (1.0 - keep_prob)) + 8.0:
            raise PayloadError(f"count k = {k} is implausible for a seeded mask of {n} entries at keep_prob {keep_prob}")
    if positions == "golomb":
        b = r.u8("rice parameter")
        if b > MAX_RICE_PARAMETER:
            raise PayloadError(f"rice parameter {b} above {MAX_RICE_PARAMETER}")
        stream_len = r.varint("golomb stream length")
        if stream_len > r.left:  # check before reading k values so a bad length reads as such
            raise PayloadError(f"truncated: golomb stream length {stream_len} exceeds the {r.left} bytes left")
        # k positions in [0, n): k (b + 1) bits plus at most (n >> b) + 1 unary zeros, padded to a
        # byte; a longer stream cannot be valid, and expanding it would cost 8+ bytes per bit
        most = (k * (b + 1) + (n >> b) + 1 + 7) // 8 if k else 0
        if stream_len > most:
            raise PayloadError(f"golomb stream of {stream_len} bytes; {k} positions in {n} need at most {most}")
    values = _read_values(r, k, value_dtype, allow_zero=positions == "seeded")

    if positions == "seeded":
        mask = seeded_keep_mask(shape, seed_info[1], seed_info[0]).reshape(-1).numpy()
        kept = int(mask.sum())
        if kept != k:
            raise PayloadError(f"seeded mask keeps {kept} entries, header says k = {k}")
        idx = np.flatnonzero(mask)
    elif positions == "bitmap":
        raw = np.frombuffer(r.take((n + 7) // 8, f"bitmap of {n} bits"), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")
        if bits[n:].any():
            raise PayloadError("bitmap has non-zero padding bits")
        idx = np.flatnonzero(bits[:n].view(np.bool_))  # 0/1 bytes: numpy's fast boolean path
        if idx.size != k:
            raise PayloadError(f"bitmap has {idx.size} set bits, header says k = {k}")
    else:
        stream = r.take(stream_len, "golomb stream")
        try:
            idx = rice_decode(stream, k, b, n)
        except ValueError as e:
            raise PayloadError(str(e)) from e

    if buffer is not None:
        out = buffer(n, idx, values)
    else:
        out = np.zeros(n, dtype=np.float32)  # calloc: untouched pages cost no memory
        out[idx] = values
    return torch.from_numpy(out.reshape(shape)), seed_info


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise PayloadError(f"expected bytes, got {type(data).__name__}")


def decode_tensor(
    data: bytes,
    expected_shape: tuple[int, ...] | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Inverse of encode_tensor: a dense float32 tensor. Raises PayloadError on any defect."""
    data = _as_bytes(data)
    r = _Reader(data)
    t, _ = _read_record(r, expected_shape, _Limits(max_elements, max_elements))
    if r.left:
        raise PayloadError(f"{r.left} trailing bytes after the tensor record")
    return t


# --------------------------------------------------------------------------------------------
# whole payloads


def _resolve_positions(payload: Payload, positions: str | Mapping[str, str]) -> dict[str, str]:
    """Encoding per tensor: seeded for payload.seeds, else the given string or mapping (default golomb)."""
    if isinstance(positions, str):
        per_name = {}
        default = positions
    else:
        per_name = dict(positions)
        default = "golomb"
        unknown = set(per_name) - set(payload.tensors)
        if unknown:
            raise ValueError(f"positions names tensors that are not in the payload: {sorted(unknown)}")
    out = {}
    for name in payload.tensors:
        choice = per_name.get(name, default)
        if name in payload.seeds:
            if name in per_name and choice != "seeded":
                raise ValueError(f"tensor {name!r} has a seed, but positions asks for {choice!r}")
            choice = "seeded"
        elif choice == "seeded":
            raise ValueError(f"tensor {name!r}: positions 'seeded' needs an entry in payload.seeds")
        out[name] = choice
    return out


def _put_meta(out: bytearray, name: str, value: MetaValue) -> None:
    _put_name(out, name)
    if isinstance(value, bool):
        out += bytes([_META_BOOL, int(value)])
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"meta {name!r}: int {value} outside the int64 range")
        out.append(_META_INT)
        _put_varint(out, (value << 1) ^ (value >> 63))  # zigzag
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"meta {name!r}: float {value} is not finite")
        out.append(_META_FLOAT)
        out += struct.pack("<d", value)
    elif isinstance(value, str):
        out.append(_META_STR)
        raw = value.encode("utf-8")
        _put_varint(out, len(raw))
        out += raw
    else:
        raise ValueError(f"meta {name!r}: unsupported type {type(value).__name__} (int, float, str, bool)")


def _read_meta(r: _Reader, name: str) -> MetaValue:
    tag = r.u8(f"meta {name!r} type")
    if tag == _META_BOOL:
        v = r.u8(f"meta {name!r} bool")
        if v > 1:
            raise PayloadError(f"meta {name!r}: bool byte {v} is neither 0 nor 1")
        return bool(v)
    if tag == _META_INT:
        z = r.varint(f"meta {name!r} int")
        return (z >> 1) ^ -(z & 1)
    if tag == _META_FLOAT:
        v = r.f64(f"meta {name!r} float")
        if not math.isfinite(v):
            raise PayloadError(f"meta {name!r}: non-finite float {v}")
        return v
    if tag == _META_STR:
        size = r.varint(f"meta {name!r} string length")
        if size > MAX_NAME_BYTES:
            raise PayloadError(f"meta {name!r}: string of {size} bytes, above {MAX_NAME_BYTES}")
        raw = r.take(size, f"meta {name!r} string")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PayloadError(f"meta {name!r}: string is not valid UTF-8") from e
    raise PayloadError(f"meta {name!r}: unknown type tag {tag}")


def _encode_parts(
    payload: Payload, positions: str | Mapping[str, str], value_dtype: str
) -> tuple[bytearray, dict[str, dict]]:
    """The payload body (without checksum) and per-tensor facts for payload_stats."""
    if not isinstance(payload, Payload):
        raise TypeError(f"expected a Payload, got {type(payload).__name__}")
    _check_value_dtype(value_dtype)
    choice = _resolve_positions(payload, positions)
    out = bytearray(MAGIC)
    out.append(FORMAT_VERSION)
    _put_varint(out, len(payload.meta))
    for name in sorted(payload.meta):
        _put_meta(out, name, payload.meta[name])
    _put_varint(out, len(payload.tensors))
    facts = {}
    for name in sorted(payload.tensors):
        seed, keep_prob = payload.seeds.get(name, (None, None))
        try:
            record, n, k = _encode_record(payload.tensors[name], choice[name], value_dtype, seed, keep_prob)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from e
        _put_name(out, name)
        out += record
        facts[name] = {"positions": choice[name], "n": n, "k": k, "record_bytes": len(record)}
    return out, facts


def encode_payload_with_stats(
    payload: Payload, positions: str | Mapping[str, str] = "golomb", value_dtype: str = "fp32"
) -> tuple[bytes, dict]:
    """encode_payload and payload_stats in one pass: (bytes, stats)."""
    body, facts = _encode_parts(payload, positions, value_dtype)
    body += struct.pack("<I", zlib.crc32(body))
    vbits = VALUE_BITS[value_dtype]
    total = 0.0
    for f in facts.values():
        if f["positions"] == "seeded":
            f["bound_bits"] = float(f["k"] * vbits)
        else:
            f["bound_bits"] = information_bound_bits(f["n"], f["k"], vbits)
        total += f["bound_bits"]
    stats = {
        "bytes": len(body),
        "bound_bits": total,
        "bound_bytes": total / 8.0,
        "value_bits": vbits,
        "tensors": facts,
    }
    return bytes(body), stats


def encode_payload(
    payload: Payload, positions: str | Mapping[str, str] = "golomb", value_dtype: str = "fp32"
) -> bytes:
    """The payload's bytes. Meta fields and tensors go in sorted name order (code point order).

    positions: one encoding for every tensor, or a mapping name -> encoding (names left out use
    golomb). Tensors in payload.seeds always use seeded positions.
    """
    return encode_payload_with_stats(payload, positions, value_dtype)[0]


def decode_payload(
    data: bytes,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_total_elements: int = DEFAULT_MAX_ELEMENTS,
    require_all: bool = True,
    buffers: DecodeBuffers | None = None,
) -> Payload:
    """Inverse of encode_payload. Raises PayloadError on any defect, naming the tensor.

    With expected_shapes, the payload must hold exactly those names (with `require_all=False`:
    some of them) with exactly those shapes (checked before any tensor is allocated).
    With `buffers`, sparse tensors are decoded into those reused arrays (DecodeBuffers: the
    result is valid only until the next decode with them).
    """
    data = _as_bytes(data)
    if len(data) > max_bytes:
        raise PayloadError(f"payload is {len(data)} bytes, above max_bytes = {max_bytes}")
    if len(data) < len(MAGIC) + 1 + 2 + 4:
        raise PayloadError(f"truncated: {len(data)} bytes is shorter than an empty payload")
    if data[: len(MAGIC)] != MAGIC:
        raise PayloadError(f"bad magic {data[:len(MAGIC)]!r}, expected {MAGIC!r}")
    if data[len(MAGIC)] != FORMAT_VERSION:
        raise PayloadError(f"unsupported format version {data[len(MAGIC)]}, this decoder reads {FORMAT_VERSION}")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise PayloadError("checksum mismatch: payload corrupted or truncated")

    r = _Reader(data, start=len(MAGIC) + 1, end=len(data) - 4)
    meta: dict[str, MetaValue] = {}
    prev = None
    count = r.varint("meta count")
    if count > MAX_META:
        raise PayloadError(f"{count} meta entries, above {MAX_META}")
    for _ in range(count):
        name = r.name("meta name")
        if prev is not None and name <= prev:
            raise PayloadError(f"meta {name!r} out of order or duplicated (names must be sorted)")
        meta[name] = _read_meta(r, name)
        prev = name

    tensors: dict[str, torch.Tensor] = {}
    seeds: dict[str, tuple[int, float]] = {}
    total_left = max_total_elements
    prev = None
    for _ in range(r.varint("tensor count")):
        name = r.name("tensor name")
        if prev is not None and name <= prev:
            raise PayloadError(f"tensor {name!r} out of order or duplicated (names must be sorted)")
        prev = name
        if expected_shapes is not None and name not in expected_shapes:
            raise PayloadError(f"unexpected tensor {name!r}")
        expected = None if expected_shapes is None else expected_shapes[name]
        try:
            fill = None if buffers is None else functools.partial(buffers.scatter, name)
            t, seed_info = _read_record(r, expected, _Limits(max_elements, total_left), fill)
        except PayloadError as e:
            raise PayloadError(f"tensor {name!r}: {e}") from e
        total_left -= t.numel()
        tensors[name] = t
        if seed_info is not None:
            seeds[name] = seed_info
    if r.left:
        raise PayloadError(f"{r.left} trailing bytes after the last tensor")
    if expected_shapes is not None and require_all:
        missing = sorted(set(expected_shapes) - set(tensors))
        if missing:
            raise PayloadError(f"missing tensors: {missing}")
    return Payload(tensors=tensors, seeds=seeds, meta=meta)


# --------------------------------------------------------------------------------------------
# sizes


def information_bound_bits(n: int, k: int, value_bits: float) -> float:
    """k * value_bits + log2 C(n, k): the fewest bits that convey k values at arbitrary positions.

    Exact (math.comb) for n <= 20000, lgamma above.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got n = {n}, k = {k}")
    if value_bits < 0:
        raise ValueError(f"value_bits must be >= 0, got {value_bits}")
    if n <= 20000:
        log2_comb = math.log2(math.comb(n, k))
    else:
        log2_comb = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2.0)
    return k * value_bits + max(0.0, log2_comb)


def payload_stats(
    payload: Payload, positions: str | Mapping[str, str] = "golomb", value_dtype: str = "fp32"
) -> dict:
    """Wire bytes of encode_payload(payload, positions, value_dtype) next to the information bound.

    The bound depends on the content, not on the chosen encoding: for each tensor with k entries
    that are non-zero in the value dtype, k * value_bits + log2 C(n, k); for a seeded tensor,
    whose positions are free, k * value_bits with k the mask's count. Returns
    {"bytes", "bound_bits", "bound_bytes", "value_bits",
     "tensors": {name: {"positions", "n", "k", "record_bytes", "bound_bits"}}}.
    The runtime logs stats["bound_bytes"] as upload_bound_bytes.
    """
    return encode_payload_with_stats(payload, positions, value_dtype)[1]
