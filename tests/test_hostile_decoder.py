"""Memory bombs against the decoder: every count is checked before anything is allocated, so
peak memory while decoding stays within a small multiple of the largest legitimate tensor."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import pytest
import torch

from fedlowrank.codec import MAGIC, PayloadError, _put_varint, decode_payload, decode_tensor, encode_payload, encode_tensor
from fedlowrank.payload import Payload
from fedlowrank.sparsify import seeded_keep_mask


def v(x: int) -> bytes:
    out = bytearray()
    _put_varint(out, x)
    return bytes(out)


def peak_of(fn) -> int:
    """Peak bytes numpy and Python allocated while `fn` ran (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
    except PayloadError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_a_golomb_stream_far_longer_than_its_positions_can_need_is_refused_before_expansion():
    honest = torch.zeros(256)
    honest[::16] = 1.0
    good = encode_tensor(honest, "golomb")
    assert torch.equal(decode_tensor(good, (256,)), honest)
    tag = good[0]
    k = 16
    stream = bytes(16 * 2**20)  # 16 MiB of zeros for 16 positions among 256
    bomb = bytes([tag]) + v(1) + v(256) + v(k) + bytes([0]) + v(len(stream)) + struct.pack("<f", 1.0) * k + stream
    with pytest.raises(PayloadError, match="golomb stream of 16777216 bytes; 16 positions in 256 need at most"):
        decode_tensor(bomb, (256,))
    assert peak_of(lambda: decode_tensor(bomb, (256,))) < 2**20  # was about 1.2 GiB (73x the input)


def test_a_seeded_record_with_an_implausible_count_never_builds_its_mask(monkeypatch):
    import fedlowrank.codec as codec

    calls = []
    monkeypatch.setattr(codec, "seeded_keep_mask", lambda *a: calls.append(a) or seeded_keep_mask(*a))
    t = torch.randn(1000)
    keep = seeded_keep_mask((1000,), 0.1, 7).reshape(-1)
    p = Payload({"w": t * keep}, seeds={"w": (7, 0.1)})
    data = encode_payload(p)
    calls.clear()
    assert torch.equal(decode_payload(data).tensors["w"], t * keep) and len(calls) == 1
    # 30 bytes claiming a 2^30-element tensor at keep_prob 0.5 with k = 1: refused from the header
    tag = data[data.index(b"w") + 1]
    rec = bytes([tag]) + v(1) + v(2**30) + v(7) + struct.pack("<d", 0.5) + v(1) + struct.pack("<f", 1.0)
    body = MAGIC + bytes([data[len(MAGIC)]]) + v(0) + v(1) + v(1) + b"w" + rec
    bomb = body + struct.pack("<I", zlib.crc32(body))
    calls.clear()
    with pytest.raises(PayloadError, match="implausible for a seeded mask"):
        decode_payload(bomb)
    assert calls == []


def test_meta_entries_and_strings_are_bounded():
    body = MAGIC + bytes([1]) + v(10**6)
    with pytest.raises(PayloadError, match="1000000 meta entries, above 256"):
        decode_payload(body + b"\0" * 8 + struct.pack("<I", zlib.crc32(body + b"\0" * 8)))
    big = Payload({}, meta={"note": "x" * 5000})
    with pytest.raises(PayloadError, match="string of 5000 bytes"):
        decode_payload(encode_payload(big))


def test_a_broadcast_is_decoded_against_the_sent_shapes_on_the_client():
    """The client side decodes catch-ups with the sent keys' shapes: a record naming a huge or
    unknown tensor is refused before allocation, and a broadcast may hold some of the keys."""
    from fedlowrank.algorithms import make_algorithm
    from fedlowrank.protocol import ClientWorker, RunSetup
    from fedlowrank.roundconfig import SimConfig
    from fedlowrank.tasks import make_task

    task = make_task("digits", {"mode": "lora", "num_clients": 2}, 0).build()
    setup = RunSetup.of(task, make_algorithm("fedavg"), 0)
    worker = ClientWorker(task, setup, SimConfig(), 0)
    sent = setup.initial_sent()
    one = setup.sent[0]
    part = encode_payload(Payload({one: torch.ones(setup.sent_shapes[one])}, meta={"kind": "delta", "round": 1}))
    out = worker._apply(sent, part)  # some of the keys: fine
    assert torch.equal(out[one], sent[one] + 1)
    alien = encode_payload(Payload({"zzz": torch.ones(2**20)}, meta={"kind": "delta", "round": 1}))
    with pytest.raises(PayloadError, match="unexpected tensor 'zzz'"):
        worker._apply(sent, alien)
    with pytest.raises(PayloadError, match="missing tensors"):
        worker._apply(sent, part, full=True)  # the full state must hold every sent key


# --- fuzzing whole payloads, the checksum recomputed after each mutation ----------------------
SHAPES = {"a.lora_A": (8, 64), "a.lora_B": (64, 8), "b.bias": (64,)}


def _payloads(rng) -> list[bytes]:
    """Honest uploads of every encoding the codec writes (golomb, bitmap, dense, seeded, auto)."""
    out = []
    for positions, dtype in (("golomb", "fp32"), ("bitmap", "bf16"), ("dense", "fp16"), ("auto", "fp32")):
        t = {k: torch.randn(s, generator=rng) * (torch.rand(s, generator=rng) < 0.2) for k, s in SHAPES.items()}
        out.append(encode_payload(Payload(t, meta={"round": 3, "client": 1, "kind": "delta"}), positions, dtype))
    keep = seeded_keep_mask(SHAPES["a.lora_A"], 0.3, 11)
    t = {k: torch.randn(s, generator=rng) for k, s in SHAPES.items()}
    t["a.lora_A"] = t["a.lora_A"] * keep
    out.append(encode_payload(Payload(t, seeds={"a.lora_A": (11, 0.3)}, meta={"round": 3, "client": 1})))
    return out


def mutate(data: bytes, rng) -> bytes:
    body = bytearray(data[:-4])
    for _ in range(int(torch.randint(1, 5, (1,), generator=rng))):
        op = int(torch.randint(0, 5, (1,), generator=rng))
        i = int(torch.randint(len(MAGIC) + 1, max(len(MAGIC) + 2, len(body)), (1,), generator=rng))
        if op == 0 and i < len(body):  # flip bits of one byte
            body[i] ^= int(torch.randint(1, 256, (1,), generator=rng))
        elif op == 1:  # insert bytes (a header field grows)
            body[i:i] = bytes(torch.randint(0, 256, (int(torch.randint(1, 9, (1,), generator=rng)),), generator=rng).tolist())
        elif op == 2:  # delete bytes
            del body[i : i + int(torch.randint(1, 9, (1,), generator=rng))]
        elif op == 3:  # a large varint where a count or a dimension was
            body[i : i + 1] = v(int(torch.randint(0, 2**62, (1,), generator=rng)) >> int(torch.randint(0, 62, (1,), generator=rng)))
        else:  # truncate
            del body[i:]
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def fuzz(cases: int, seed: int = 0) -> dict[str, int]:
    """Decode `cases` mutated payloads on the server path (expected shapes) and without shapes;
    every outcome must be a PayloadError or a payload with the expected shapes and finite values.
    Returns counts of each outcome; raises AssertionError on anything else."""
    rng = torch.Generator().manual_seed(seed)
    honest = _payloads(rng)
    counts = {"rejected": 0, "decoded": 0}
    for c in range(cases):
        bad = mutate(honest[c % len(honest)], rng)
        for shapes in (SHAPES, None):
            try:
                p = decode_payload(bad, shapes, max_elements=2**16, max_total_elements=2**16)
            except PayloadError:
                counts["rejected"] += 1
                continue
            except Exception as e:  # noqa: BLE001 - the bug this fuzzer looks for
                raise AssertionError(f"case {c}: {type(e).__name__}: {e}; input {bad.hex()}") from e
            counts["decoded"] += 1
            for k, t in p.tensors.items():
                assert shapes is None or tuple(t.shape) == shapes[k]
                assert bool(torch.isfinite(t).all()) and t.numel() <= 2**16
    return counts


def test_fuzzed_whole_payloads_end_in_a_payload_error_or_a_correct_decode():
    counts = fuzz(600)
    assert counts["rejected"] > 0 and sum(counts.values()) == 1200
