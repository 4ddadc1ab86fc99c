"""Tests for fedlowrank.codec and fedlowrank.golomb: round trips, every rejection, fuzzing, sizes."""

from __future__ import annotations

import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlowrank.codec import (
    FORMAT_VERSION,
    MAGIC,
    DecodeBuffers,
    PayloadError,
    _put_varint,
    decode_payload,
    decode_tensor,
    encode_payload,
    encode_payload_with_stats,
    encode_tensor,
    information_bound_bits,
    payload_stats,
)
from fedlowrank.golomb import _gaps, choose_rice_parameter, rice_cost_bits, rice_decode, rice_encode
from fedlowrank.payload import Payload
from fedlowrank.sparsify import dare, seeded_keep_mask

POSITIONS = ["golomb", "bitmap", "dense"]
DTYPES = ["fp32", "bf16", "fp16"]
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TAG = {"dense": 0, "bitmap": 1, "golomb": 2, "seeded": 3}
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def v(x: int) -> bytes:
    out = bytearray()
    _put_varint(out, x)
    return bytes(out)


def sparse(shape, density, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < density, t, torch.zeros(()))


def expected_after(t: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """What a sparse encoding must decode to: t rounded to the value dtype, every zero +0.0."""
    e = t.to(TORCH_DTYPE[value_dtype]).float()
    return torch.where(e == 0, torch.zeros(()), e)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


# ------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (37,), (64, 100), (3, 4, 5), ()])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_round_trip(positions, value_dtype, shape, density):
    t = sparse(shape, density, seed=len(shape) * 7 + int(density * 100))
    if t.numel() > 2:
        t.reshape(-1)[1] = -0.0
    data = encode_tensor(t, positions, value_dtype)
    out = decode_tensor(data, expected_shape=shape)
    if positions == "dense":
        assert bits_equal(out, t.to(TORCH_DTYPE[value_dtype]).float())  # -0.0 kept as sent
    else:
        assert bits_equal(out, expected_after(t, value_dtype))
    if value_dtype == "fp32" and positions != "dense":
        assert bits_equal(out, torch.where(t == 0, torch.zeros(()), t))  # bit-exact


def test_zero_size_and_all_zero_tensors():
    for positions in POSITIONS:
        empty = torch.zeros(0, 5)
        assert decode_tensor(encode_tensor(empty, positions)).shape == (0, 5)
        zeros = torch.zeros(4096)
        data = encode_tensor(zeros, positions)
        assert bits_equal(decode_tensor(data), zeros)
    assert len(encode_tensor(torch.zeros(4096), "golomb")) == 7  # tag, ndim, dim (2 bytes), k, b, stream length


def test_fp64_and_gpu_style_inputs_are_cast_to_fp32():
    t = sparse((10, 10), 0.3).double()
    assert bits_equal(decode_tensor(encode_tensor(t)), expected_after(t.float(), "fp32"))


def test_values_that_underflow_are_dropped_and_overflow_is_refused():
    t = torch.tensor([1e-30, 0.5, -1e-9, 0.0])
    out = decode_tensor(encode_tensor(t, "golomb", "fp16"))
    assert bits_equal(out, torch.tensor([0.0, 0.5, 0.0, 0.0]))  # fp16 flushes 1e-30 and -1e-9 to zero
    assert bits_equal(decode_tensor(encode_tensor(t, "bitmap", "bf16")), expected_after(t, "bf16"))
    with pytest.raises(ValueError, match="overflows fp16"):
        encode_tensor(torch.tensor([70000.0]), "golomb", "fp16")


def test_encoder_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensor(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensor(torch.tensor([1e300], dtype=torch.float64))  # inf after the cast
    with pytest.raises(ValueError, match="floating-point"):
        encode_tensor(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown positions"):
        encode_tensor(torch.ones(3), "indices")
    with pytest.raises(ValueError, match="unknown value_dtype"):
        encode_tensor(torch.ones(3), "golomb", "int8")
    with pytest.raises(ValueError, match="seed and keep_prob"):
        encode_tensor(torch.ones(3), "seeded")
    with pytest.raises(ValueError, match="seed and keep_prob"):
        encode_tensor(torch.ones(3), "golomb", seed=1, keep_prob=0.5)
    with pytest.raises(TypeError):
        encode_tensor(np.ones(3))


@settings(max_examples=60, deadline=None)
@given(seeds=st.lists(st.integers(0, 10**6), min_size=1, max_size=6),
       densities=st.lists(st.sampled_from([0.0, 0.01, 0.2, 0.7, 1.0]), min_size=6, max_size=6),
       positions=st.lists(st.sampled_from(["golomb", "bitmap", "dense", "seeded"]), min_size=6, max_size=6))
def test_decoding_into_reused_buffers_equals_a_fresh_decode(seeds, densities, positions):
    """A sequence of payloads with different supports (and encodings, one of them corrupt):
    each decode into the shared DecodeBuffers equals a fresh decode bit for bit; what the
    previous one wrote never shows through, and a failed decode spoils nothing after it."""
    buffers = DecodeBuffers()
    shapes = {"a": (30, 20), "b": (7,)}
    for j, seed in enumerate(seeds):
        tensors = {"a": sparse((30, 20), densities[j], seed), "b": sparse((7,), densities[-j - 1], seed + 1)}
        pos, seeded = positions[j], {}
        if pos == "seeded":
            tensors["a"] = dare(torch.randn(30, 20), 0.6, seed=seed)
            seeded = {"a": (seed, 0.4)}
        data = encode_payload(Payload(tensors, seeds=seeded), {"a": pos, "b": "golomb"})
        if j == 2:  # a corrupt payload (its checksum made valid): the decodes after it are unharmed
            bad = bytearray(data[:-4])
            bad[len(bad) // 2] ^= 0xFF
            try:  # refused part-way through, or (a flipped value) decoded
                decode_payload(with_crc(bytes(bad)), shapes, buffers=buffers)
            except PayloadError:
                pass
        fresh = decode_payload(data, shapes)
        reused = decode_payload(data, shapes, buffers=buffers)
        for k in shapes:
            assert bits_equal(reused.tensors[k], fresh.tensors[k]), (j, k, pos)
        assert reused.seeds == fresh.seeds


def test_reused_buffers_are_views_the_next_decode_overwrites():
    buffers = DecodeBuffers()
    one = encode_payload(Payload({"a": sparse((50,), 0.3, 1)}))
    two = encode_payload(Payload({"a": sparse((50,), 0.3, 2)}))
    first = decode_payload(one, buffers=buffers).tensors["a"]
    kept = first.clone()
    decode_payload(two, buffers=buffers)
    assert not torch.equal(first, kept)  # documented: only for a consumer done with each upload
    assert bits_equal(decode_payload(one, buffers=buffers).tensors["a"], kept)


@pytest.mark.parametrize("value_dtype", DTYPES)
def test_seeded_round_trip(value_dtype):
    t = dare(torch.randn(50, 64), 0.8, seed=11)
    data = encode_tensor(t, "seeded", value_dtype, seed=11, keep_prob=0.2)
    k = int(seeded_keep_mask(t.shape, 0.2, 11).sum())
    vb = {"fp32": 4, "bf16": 2, "fp16": 2}[value_dtype]
    assert len(data) <= k * vb + 20  # values only, no positions
    assert bits_equal(decode_tensor(data), t.to(TORCH_DTYPE[value_dtype]).float())
    with pytest.raises(ValueError, match="outside its seeded keep mask"):
        encode_tensor(torch.ones(50, 64), "seeded", seed=11, keep_prob=0.2)


def test_seeded_keeps_zero_values_at_mask_positions():
    mask = seeded_keep_mask((20,), 0.5, 3)
    t = torch.where(mask, torch.arange(20.0) - 5.0, torch.zeros(()))  # one kept value may be 0
    t[torch.nonzero(mask)[0]] = -0.0
    assert bits_equal(decode_tensor(encode_tensor(t, "seeded", seed=3, keep_prob=0.5)), t)


def make_payload() -> Payload:
    return Payload(
        tensors={
            "layer.1.lora_B": sparse((128, 16), 0.1, 1),
            "layer.0.lora_A": sparse((16, 96), 0.05, 2),
            "layer.0.lora_B": dare(torch.randn(96, 16), 0.8, 5),
            "bias": torch.randn(7),
        },
        seeds={"layer.0.lora_B": (5, 0.2)},
        meta={"round": 3, "neg": -(2**63), "big": 2**63 - 1, "lr": 1e-4, "kind": "délta", "flag": True},
    )


@pytest.mark.parametrize("value_dtype", DTYPES)
def test_payload_round_trip(value_dtype):
    p = make_payload()
    data = encode_payload(p, positions={"bias": "dense", "layer.1.lora_B": "bitmap"}, value_dtype=value_dtype)
    shapes = {n: tuple(t.shape) for n, t in p.tensors.items()}
    q = decode_payload(data, expected_shapes=shapes)
    assert q.meta == p.meta and all(type(q.meta[k]) is type(p.meta[k]) for k in p.meta)
    assert q.seeds == p.seeds
    assert list(q.tensors) == sorted(p.tensors)
    for name, t in p.tensors.items():
        assert bits_equal(q.tensors[name], expected_after(t, value_dtype))


def test_payload_bytes_do_not_depend_on_insertion_order():
    p = make_payload()
    shuffled = Payload(
        tensors=dict(reversed(list(p.tensors.items()))), seeds=p.seeds, meta=dict(reversed(list(p.meta.items())))
    )
    assert encode_payload(p) == encode_payload(shuffled)


def test_payload_positions_rules():
    p = make_payload()
    with pytest.raises(ValueError, match="has a seed"):
        encode_payload(p, positions={"layer.0.lora_B": "golomb"})
    with pytest.raises(ValueError, match="needs an entry in payload.seeds"):
        encode_payload(p, positions="seeded")
    with pytest.raises(ValueError, match="not in the payload"):
        encode_payload(p, positions={"nope": "dense"})
    with pytest.raises(ValueError, match="tensor 'bias'"):
        encode_payload(Payload({"bias": torch.tensor([float("inf")])}))
    with pytest.raises(ValueError, match="unsupported type"):
        encode_payload(Payload({}, meta={"x": [1]}))
    with pytest.raises(ValueError, match="not finite"):
        encode_payload(Payload({}, meta={"x": float("nan")}))
    empty = decode_payload(encode_payload(Payload({})))
    assert empty.tensors == {} and empty.meta == {} and empty.seeds == {}


def test_payload_stats():
    p = make_payload()
    stats = payload_stats(p, positions={"bias": "dense"}, value_dtype="bf16")
    assert stats["bytes"] == len(encode_payload(p, positions={"bias": "dense"}, value_dtype="bf16"))
    per = stats["tensors"]
    seeded_k = int(seeded_keep_mask((96, 16), 0.2, 5).sum())
    assert per["layer.0.lora_B"]["bound_bits"] == seeded_k * 16
    A = p.tensors["layer.0.lora_A"]
    kA = int((A.bfloat16() != 0).sum())
    assert per["layer.0.lora_A"]["bound_bits"] == pytest.approx(information_bound_bits(A.numel(), kA, 16))
    assert per["bias"]["bound_bits"] == pytest.approx(7 * 16)  # dense, all non-zero: log2 C(7,7) = 0
    assert stats["bound_bits"] == pytest.approx(sum(f["bound_bits"] for f in per.values()))
    assert stats["bound_bytes"] == pytest.approx(stats["bound_bits"] / 8)
    assert stats["bytes"] >= stats["bound_bytes"]
    data, same = encode_payload_with_stats(p, positions={"bias": "dense"}, value_dtype="bf16")
    assert same == stats and data == encode_payload(p, positions={"bias": "dense"}, value_dtype="bf16")


# ------------------------------------------------------------------------------------------
# rejections: one tensor


def test_every_prefix_is_truncated():
    for positions, kw in [("golomb", {}), ("bitmap", {}), ("dense", {}), ("seeded", {"seed": 2, "keep_prob": 0.5})]:
        t = sparse((9, 13), 0.3) if positions != "seeded" else dare(torch.randn(9, 13), 0.5, 2)
        data = encode_tensor(t, positions, **kw)
        for cut in range(len(data)):
            with pytest.raises(PayloadError, match="truncated"):
                decode_tensor(data[:cut])


def test_trailing_garbage():
    with pytest.raises(PayloadError, match="1 trailing bytes"):
        decode_tensor(encode_tensor(sparse((30,), 0.3)) + b"\x00")


def test_unknown_codes():
    with pytest.raises(PayloadError, match="unknown position encoding code 5"):
        decode_tensor(bytes([5 << 2 | 0]) + v(1) + v(3))
    with pytest.raises(PayloadError, match="unknown value dtype code 3"):
        decode_tensor(bytes([TAG["golomb"] << 2 | 3]) + v(1) + v(3))


def test_shape_checks_happen_before_reading_anything_else():
    data = encode_tensor(sparse((4, 6), 0.5))
    with pytest.raises(PayloadError, match=r"shape \(4, 6\) differs from expected \(6, 4\)"):
        decode_tensor(data, expected_shape=(6, 4))
    with pytest.raises(PayloadError, match="ndim 33 above 32"):
        decode_tensor(bytes([0]) + v(33))


def test_oversized_headers_are_rejected_without_allocating():
    t0 = time.perf_counter()
    tiny = bytes([TAG["golomb"] << 2]) + v(1) + v(2**40) + v(0) + bytes([0]) + v(0)  # all-zero 2^40
    assert len(tiny) <= 12
    with pytest.raises(PayloadError, match="max_elements"):
        decode_tensor(tiny)
    for dims in [(2**20, 2**20, 2**20), (2**63, 2**63), (0, 2**40)]:  # product overflow, huge dims
        data = bytes([TAG["dense"] << 2]) + v(len(dims)) + b"".join(v(d) for d in dims)
        with pytest.raises(PayloadError, match="max_elements"):
            decode_tensor(data)
    with pytest.raises(PayloadError, match="max_elements = 1000"):
        decode_tensor(bytes([TAG["bitmap"] << 2]) + v(2) + v(100) + v(11) + v(0), max_elements=1000)
    with pytest.raises(PayloadError, match="truncated: 100000 fp32 values needs 400000 bytes"):  # k checked against data
        decode_tensor(bytes([TAG["golomb"] << 2]) + v(1) + v(10**6) + v(10**5) + bytes([3]) + v(0))
    with pytest.raises(PayloadError, match="varint seed above 2\\^64"):
        decode_tensor(bytes([TAG["seeded"] << 2]) + v(1) + v(5) + b"\xff" * 9 + b"\x7f")
    with pytest.raises(PayloadError, match="longer than 10 bytes"):
        decode_tensor(bytes([TAG["dense"] << 2]) + v(1) + b"\xff" * 11)
    with pytest.raises(PayloadError, match="overlong varint for dimension 0"):
        decode_tensor(bytes([TAG["dense"] << 2]) + v(1) + b"\x85\x00")
    assert time.perf_counter() - t0 < 1.0


def test_a_ten_byte_input_allocates_no_physical_memory():
    """An all-zero tensor of 2^28 entries from 10 bytes: the output is calloc'd, never touched."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    tiny = bytes([TAG["golomb"] << 2]) + v(1) + v(2**28) + v(0) + bytes([0]) + v(0)
    assert len(tiny) == 10
    before = rss()
    out = decode_tensor(tiny)
    assert out.shape == (2**28,)
    assert rss() - before < 64 * 2**20
    del out


def test_count_checks():
    head = lambda enc, n: bytes([TAG[enc] << 2]) + v(1) + v(n)  # noqa: E731
    one = struct.pack("<f", 1.0)
    with pytest.raises(PayloadError, match="count k = 11 exceeds n = 10"):
        decode_tensor(head("bitmap", 10) + v(11))
    # bitmap: two values announced, three bits set / padding bit set
    with pytest.raises(PayloadError, match="bitmap has 3 set bits, header says k = 2"):
        decode_tensor(head("bitmap", 10) + v(2) + one * 2 + bytes([0b111, 0]))
    with pytest.raises(PayloadError, match="padding bits"):
        decode_tensor(head("bitmap", 10) + v(2) + one * 2 + bytes([0b11, 0b100]))
    # golomb, b = 0: gaps are plain unary, "1" = gap 0
    with pytest.raises(PayloadError, match="holds 2 positions, fewer than k = 3"):
        decode_tensor(head("golomb", 10) + v(3) + bytes([0]) + v(1) + one * 3 + bytes([0b11]))
    with pytest.raises(PayloadError, match="more than k = 2 positions"):
        decode_tensor(head("golomb", 10) + v(2) + bytes([0]) + v(1) + one * 2 + bytes([0b111]))
    with pytest.raises(PayloadError, match="stream is 2 bytes but its 2 positions end within 1"):
        decode_tensor(head("golomb", 10) + v(2) + bytes([0]) + v(2) + one * 2 + bytes([0b11, 0]))
    # unary bits (LSB first) 0,1 | 0,0,0,0,0,0,0,0,1: gaps 1 and 8, indices 1 and 10
    stream = v(2) + one * 2 + bytes([0b10, 0b100])
    assert decode_tensor(head("golomb", 12) + v(2) + bytes([0]) + stream).nonzero().tolist() == [[1], [10]]
    with pytest.raises(PayloadError, match="golomb index 10 past n = 10"):
        decode_tensor(head("golomb", 10) + v(2) + bytes([0]) + stream)
    with pytest.raises(PayloadError, match="golomb index past n = 4"):  # one quotient alone too big
        decode_tensor(head("golomb", 4) + v(1) + bytes([0]) + v(1) + one + bytes([0b100000]))
    with pytest.raises(PayloadError, match="rice parameter 63 above 62"):
        decode_tensor(head("golomb", 10) + v(1) + bytes([63]) + v(1) + one + bytes([1]))
    with pytest.raises(PayloadError, match="golomb stream length 9 exceeds"):
        decode_tensor(head("golomb", 10) + v(1) + bytes([0]) + v(9) + one + bytes([1]))
    with pytest.raises(PayloadError, match="too short"):
        decode_tensor(head("golomb", 1000) + v(2) + bytes([9]) + v(1) + one * 2 + bytes([0xFF]))
    with pytest.raises(PayloadError, match="golomb stream of 1 bytes; 0 positions"):
        decode_tensor(head("golomb", 10) + v(0) + bytes([0]) + v(1) + bytes([0]))


def test_value_checks():
    for bad in [float("nan"), float("inf"), -float("inf")]:
        data = bytes([TAG["golomb"] << 2]) + v(1) + v(4) + v(1) + bytes([0]) + v(1) + struct.pack("<f", bad) + bytes([1])
        with pytest.raises(PayloadError, match="non-finite value"):
            decode_tensor(data)
    with pytest.raises(PayloadError, match="non-finite value"):  # bf16 NaN in a dense record
        decode_tensor(bytes([TAG["dense"] << 2 | 1]) + v(1) + v(2) + b"\x80\x3f\xc0\x7f")
    with pytest.raises(PayloadError, match="explicit zero at value 0"):
        decode_tensor(bytes([TAG["bitmap"] << 2]) + v(1) + v(4) + v(1) + struct.pack("<f", -0.0) + bytes([1]))


def test_seeded_header_checks():
    def seeded(seed, p, k, values=b""):
        return bytes([TAG["seeded"] << 2]) + v(1) + v(100) + v(seed) + struct.pack("<d", p) + v(k) + values

    for p in [0.0, -0.5, 1.5, float("nan")]:
        with pytest.raises(PayloadError, match="keep_prob .* outside"):
            decode_tensor(seeded(1, p, 0))
    with pytest.raises(PayloadError, match="seed .* above 2\\^63"):
        decode_tensor(seeded(2**63, 0.5, 0))
    k = int(seeded_keep_mask((100,), 0.5, 1).sum())
    with pytest.raises(PayloadError, match=f"seeded mask keeps {k} entries, header says k = {k + 1}"):
        decode_tensor(seeded(1, 0.5, k + 1, b"\x00" * 4 * (k + 1)))
    with pytest.raises(PayloadError, match="count k = 101 exceeds n = 100"):
        decode_tensor(seeded(1, 0.5, 101))


def test_not_bytes():
    with pytest.raises(PayloadError, match="expected bytes, got str"):
        decode_tensor("abc")
    assert decode_tensor(bytearray(encode_tensor(torch.ones(3)))).tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------
# rejections: payloads


def test_payload_envelope_checks():
    data = encode_payload(make_payload())
    with pytest.raises(PayloadError, match="bad magic"):
        decode_payload(b"XLRK" + data[4:])
    with pytest.raises(PayloadError, match="unsupported format version 2"):
        decode_payload(MAGIC + bytes([2]) + data[5:])
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decode_payload(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decode_payload(data[:-1])
    with pytest.raises(PayloadError, match="truncated"):
        decode_payload(data[:8])
    with pytest.raises(PayloadError, match="above max_bytes = 100"):
        decode_payload(data, max_bytes=100)
    with pytest.raises(PayloadError, match="3 trailing bytes after the last tensor"):
        decode_payload(with_crc(data[:-4] + b"abc"))
    with pytest.raises(PayloadError, match="truncated"):  # a cut with a valid checksum
        decode_payload(with_crc(data[:-40]))
    with pytest.raises(PayloadError, match="expected bytes"):
        decode_payload(None)


def test_payload_expected_shapes():
    p = make_payload()
    data = encode_payload(p)
    shapes = {n: tuple(t.shape) for n, t in p.tensors.items()}
    fewer = Payload({k: t for k, t in p.tensors.items() if k != "layer.1.lora_B"}, p.seeds, p.meta)
    with pytest.raises(PayloadError, match=r"missing tensors: \['layer.1.lora_B'\]"):
        decode_payload(encode_payload(fewer), shapes)
    with pytest.raises(PayloadError, match="unexpected tensor 'bias'"):
        decode_payload(data, {k: s for k, s in shapes.items() if k != "bias"})
    with pytest.raises(PayloadError, match=r"tensor 'layer.0.lora_A': shape \(16, 96\) differs from expected \(96, 16\)"):
        decode_payload(data, shapes | {"layer.0.lora_A": (96, 16)})
    with pytest.raises(PayloadError, match=r"missing tensors: \['extra'\]"):
        decode_payload(data, shapes | {"extra": (3,)})


def test_payload_limits_and_tensor_names_in_messages():
    p = make_payload()
    data = encode_payload(p)
    with pytest.raises(PayloadError, match="tensor 'layer.0.lora_A': shape declares more than max_elements = 1000"):
        decode_payload(data, max_elements=1000)
    with pytest.raises(PayloadError, match="tensor 'layer.0.lora_B': payload declares more elements in total"):
        decode_payload(data, max_total_elements=2048)
    body = bytearray(MAGIC + bytes([FORMAT_VERSION])) + v(0) + v(1) + v(3) + b"bad"
    body += encode_tensor(torch.tensor([1.0, float("nan")]).nan_to_num(0.0))[:-1]  # truncated record
    with pytest.raises(PayloadError, match="tensor 'bad': truncated"):
        decode_payload(with_crc(bytes(body)))


def test_payload_structure_checks():
    rec = encode_tensor(torch.ones(2))
    head = MAGIC + bytes([FORMAT_VERSION])
    two = lambda a, b: head + v(0) + v(2) + v(len(a)) + a + rec + v(len(b)) + b + rec  # noqa: E731
    with pytest.raises(PayloadError, match="tensor 'a' out of order or duplicated"):
        decode_payload(with_crc(two(b"b", b"a")))
    with pytest.raises(PayloadError, match="tensor 'a' out of order or duplicated"):
        decode_payload(with_crc(two(b"a", b"a")))
    with pytest.raises(PayloadError, match="tensor name is not valid UTF-8"):
        decode_payload(with_crc(head + v(0) + v(1) + v(1) + b"\xff" + rec))
    with pytest.raises(PayloadError, match="tensor name is 5000 bytes"):
        decode_payload(with_crc(head + v(0) + v(1) + v(5000)))
    meta = lambda tag, value: head + v(1) + v(1) + b"m" + bytes([tag]) + value + v(0)  # noqa: E731
    with pytest.raises(PayloadError, match="meta 'm': unknown type tag 9"):
        decode_payload(with_crc(meta(9, b"")))
    with pytest.raises(PayloadError, match="meta 'm': non-finite float"):
        decode_payload(with_crc(meta(1, struct.pack("<d", float("inf")))))
    with pytest.raises(PayloadError, match="meta 'm': bool byte 2"):
        decode_payload(with_crc(meta(3, b"\x02")))
    with pytest.raises(PayloadError, match="meta 'm': string is not valid UTF-8"):
        decode_payload(with_crc(meta(2, v(2) + b"\xc3\x28")))
    assert decode_payload(with_crc(meta(0, v(5)))).meta == {"m": -3}  # zigzag
    dup = head + v(2) + (v(1) + b"m" + bytes([3, 1])) * 2 + v(0)
    with pytest.raises(PayloadError, match="meta 'm' out of order or duplicated"):
        decode_payload(with_crc(dup))


# ------------------------------------------------------------------------------------------
# fuzzing: PayloadError or a valid result, nothing else


LIMIT = 1 << 16


def check_tensor(out: torch.Tensor) -> None:
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.numel() <= LIMIT and bool(torch.isfinite(out).all())


@st.composite
def valid_records(draw):
    shape = tuple(draw(st.lists(st.integers(0, 12), min_size=0, max_size=3)))
    positions = draw(st.sampled_from(POSITIONS + ["seeded"]))
    value_dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**20))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    if positions == "seeded":
        keep = max(density, 0.1)
        t = dare(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), 1.0 - keep, seed)
        kw = {"seed": seed, "keep_prob": keep}
    else:
        t, kw = sparse(shape, density, seed), {}
    return t, encode_tensor(t, positions, value_dtype, **kw), positions, value_dtype


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        i = pos % (len(b) + 1)
        if op == "flip" and i < len(b):
            b[i] ^= 1 << arg
        elif op == "set" and i < len(b):
            b[i] = arg
        elif op == "truncate":
            del b[i:]
        elif op == "insert":
            b.insert(i, arg)
        elif op == "delete" and i < len(b):
            del b[i]
    return bytes(b)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_into_decode_tensor(data):
    try:
        check_tensor(decode_tensor(data, max_elements=LIMIT))
    except PayloadError:
        pass


@FUZZ
@given(valid_records(), st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_records(record, ops):
    t, data, positions, value_dtype = record
    bad = mutate(data, ops)
    try:
        out = decode_tensor(bad, max_elements=LIMIT)
    except PayloadError:
        return
    check_tensor(out)
    if bad == data:
        ref = t.to(TORCH_DTYPE[value_dtype]).float()
        assert bits_equal(out, ref if positions in ("dense", "seeded") else expected_after(t, value_dtype))
    tag = bad[0] >> 2
    if tag in (0, 1, 2):  # whatever decoded re-encodes to itself
        name = {0: "dense", 1: "bitmap", 2: "golomb"}[tag]
        dt = DTYPES[bad[0] & 3]
        again = decode_tensor(encode_tensor(out, name, dt))
        assert bits_equal(again, out if name == "dense" else expected_after(out, dt))
        if name != "golomb":  # dense and bitmap records are canonical
            assert encode_tensor(out, name, dt) == bad


@FUZZ
@given(st.binary(max_size=200), st.booleans())
def test_fuzz_random_bytes_into_decode_payload(data, envelope):
    if envelope:  # get past magic, version and checksum to reach the parser
        data = with_crc(MAGIC + bytes([FORMAT_VERSION]) + data)
    try:
        p = decode_payload(data, max_elements=LIMIT, max_total_elements=LIMIT)
    except PayloadError:
        return
    for t in p.tensors.values():
        check_tensor(t)


PAYLOAD_BYTES = encode_payload(make_payload(), positions={"bias": "dense", "layer.1.lora_B": "bitmap"})
PAYLOAD_SHAPES = {n: tuple(t.shape) for n, t in make_payload().tensors.items()}


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans(), st.booleans())
def test_fuzz_mutated_payloads(ops, fix_crc, with_shapes):
    bad = mutate(PAYLOAD_BYTES, ops)
    if fix_crc and len(bad) >= 4:
        bad = with_crc(bad[:-4])
    shapes = PAYLOAD_SHAPES if with_shapes else None
    try:
        p = decode_payload(bad, shapes, max_elements=LIMIT, max_total_elements=LIMIT)
    except PayloadError:
        return
    assert isinstance(p, Payload)
    for name, t in p.tensors.items():
        check_tensor(t)
        if with_shapes:
            assert tuple(t.shape) == PAYLOAD_SHAPES[name]
    if with_shapes:
        assert set(p.tensors) == set(PAYLOAD_SHAPES)


# ------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("density", [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.214, 0.25, 0.3])
def test_golomb_positions_within_5_percent_of_log2_binomial(density):
    n = 131072  # >= 10^5
    k = round(density * n)
    rng = np.random.default_rng(int(density * 1000))
    idx = np.sort(rng.choice(n, size=k, replace=False))
    b, stream = rice_encode(idx, n)
    assert np.array_equal(rice_decode(stream, k, b, n), idx)
    bound = information_bound_bits(n, k, 0)
    assert len(stream) * 8 <= 1.05 * bound
    # the whole record: k fp32 values + positions + a few header bytes
    t = torch.zeros(n)
    t[torch.from_numpy(idx)] = 1.0 + torch.rand(k)
    record = encode_tensor(t)
    assert len(record) * 8 <= 32 * k + 1.05 * bound + 8 * 12


def test_rice_parameter_is_the_best_one():
    rng = np.random.default_rng(1)
    n = 50000
    for density in [0.001, 0.01, 0.05, 0.3, 0.7, 1.0]:
        uniform = np.sort(rng.choice(n, size=round(density * n), replace=False))
        clustered = np.flatnonzero(rng.random(n) < density * np.repeat(rng.random(50) * 2, n // 50))
        for idx in (uniform, clustered):
            gaps = _gaps(idx)
            best = min(range(20), key=lambda b: (rice_cost_bits(gaps, b), b))
            assert rice_cost_bits(gaps, choose_rice_parameter(gaps, n)) == rice_cost_bits(gaps, best)


def test_information_bound_bits():
    for n in range(0, 41):
        for k in range(0, n + 1):
            assert information_bound_bits(n, k, 16) == pytest.approx(16 * k + math.log2(math.comb(n, k)), rel=1e-12, abs=1e-12)
    for n, k in [(20001, 37), (30000, 1500), (262144, 13107)]:  # the lgamma branch
        exact = math.log2(math.comb(n, k))
        assert information_bound_bits(n, k, 0) == pytest.approx(exact, rel=1e-10)
    assert information_bound_bits(10, 0, 32) == 0.0
    with pytest.raises(ValueError):
        information_bound_bits(5, 6, 32)
    with pytest.raises(ValueError):
        information_bound_bits(5, 2, -1)


def test_sizes_against_the_bound_and_each_other():
    t = sparse((512, 64), 0.05, 3)
    n, k = t.numel(), int((t != 0).sum())
    golomb, bitmap, dense = (len(encode_tensor(t, p)) for p in POSITIONS)
    header = 1 + 1 + 2 + 1  # tag, ndim, 512 (two varint bytes), 64
    assert dense == header + 4 * n
    assert bitmap == header + len(v(k)) + 4 * k + n // 8
    assert golomb < bitmap < dense
    assert golomb * 8 <= 1.05 * information_bound_bits(n, k, 32) + 8 * 12


def test_golomb_never_costs_more_than_a_bitmap():
    n, rng = 20000, np.random.default_rng(4)
    supports = [np.flatnonzero(rng.random(n) < p) for p in (0.1, 0.3, 0.4, 0.6, 0.9, 1.0)]
    supports += [np.arange(n // 10), np.arange(n - n // 10, n), np.arange(0, n, 7)]  # packed, strided
    for idx in supports:
        assert len(rice_encode(idx, n)[1]) <= (n + 7) // 8


def test_auto_positions_pick_the_smaller_of_golomb_and_dense():
    g = torch.Generator().manual_seed(0)
    dense_t = torch.randn(64, 32, generator=g)
    sparse_t = dense_t * (torch.rand(64, 32, generator=g) < 0.05)
    for t in (dense_t, sparse_t):
        auto = encode_tensor(t, "auto")
        assert len(auto) == min(len(encode_tensor(t, "golomb")), len(encode_tensor(t, "dense")))
        assert torch.equal(decode_tensor(auto, (64, 32)), t)
    assert encode_tensor(dense_t, "auto") == encode_tensor(dense_t, "dense")
    assert encode_tensor(sparse_t, "auto") == encode_tensor(sparse_t, "golomb")
    p = Payload({"a": dense_t, "b": sparse_t})
    data = encode_payload(p, positions="auto")
    assert len(data) < len(encode_payload(p, positions="golomb"))
    out = decode_payload(data, {"a": (64, 32), "b": (64, 32)})
    assert torch.equal(out.tensors["a"], dense_t) and torch.equal(out.tensors["b"], sparse_t)


def test_a_zero_dimension_does_not_hide_huge_others():
    """Found by the fuzz test: a shape like (0, 60000, 60000, 60000) has no elements, but numpy
    refuses it with a ValueError; the decoder must say PayloadError before that."""
    from fedlowrank.codec import _put_varint

    empty = encode_tensor(torch.zeros(0, 5), "dense")
    decode_tensor(empty)  # the honest zero-size record decodes
    bad = bytearray(empty[:1])  # the same record tag (dense, fp32)
    for v in (4, 0, 60000, 60000, 60000):  # ndim, then the dimensions
        _put_varint(bad, v)
    bad += empty[4:]  # whatever followed the honest shape (tag, ndim 2, 0, 5)
    with pytest.raises(PayloadError, match="max_elements"):
        decode_tensor(bytes(bad), max_elements=65536)

