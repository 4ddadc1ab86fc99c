"""Wire format: how close each position encoding comes to the information bound, and how fast.

For golomb, bitmap and dense (the reference), at densities 1-30%, on one 4096 x 64 LoRA B matrix
and one 64 x 4096 A matrix (n = 262144 each):
  positions bits / log2 C(n, k)     what the encoding spends on positions against the bound
  record bytes / bound bytes        the whole tensor record (header, fp32 values, positions)
                                    against k * 32 + log2 C(n, k) bits
with two kinds of masks: uniformly random k-of-n sets, and FedSRD importance masks (Eq. 6 scores
on realistic LoRA deltas, top-k). Then a sweep of golomb over densities 1.0%, 1.5%, ..., 30% on
random masks (the worst case), and encode + decode times of a whole Llama-3.2-3B r = 64 LoRA
payload (392 tensors, 97.3M entries) at 5% density.

Writes benchmarks/results/wire.{json,md}.

    .venv/bin/python benchmarks/wire.py            # about 30 s on 2 cores
    .venv/bin/python benchmarks/wire.py --quick    # 2 layers instead of 28 in the timing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedlowrank.codec import decode_payload, encode_payload, encode_tensor, information_bound_bits, payload_stats
from fedlowrank.golomb import rice_encode
from fedlowrank.payload import Payload
from fedlowrank.sparsify import importance_scores, topk_mask

DENSITIES = [0.01, 0.02, 0.05, 0.10, 0.20, 0.30]
ENCODINGS = ["golomb", "bitmap", "dense"]
D_MODEL, R = 4096, 64
HIDDEN, INTER, KV, LAYERS = 3072, 8192, 1024, 28  # Llama-3.2-3B
MODULES = {  # name: (d_out, d_in)
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER),
}
RESULTS = Path(__file__).resolve().parent / "results"


def lognormal(shape, g, sigma=0.5):
    return torch.exp(sigma * torch.randn(shape, generator=g))


def lora_deltas(seed: int):
    """A mid-training LoRA module: old A, new B and the deltas, with uneven row and column norms."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(R, D_MODEL, generator=g) / D_MODEL**0.5 * lognormal((R, 1), g)  # (r, d_in)
    B = 0.02 * torch.randn(D_MODEL, R, generator=g) * lognormal((1, R), g)  # (d_out, r)
    dB = 1e-3 * torch.randn(D_MODEL, R, generator=g) * lognormal((D_MODEL, 1), g)  # rows: output features
    dA = 1e-3 * torch.randn(R, D_MODEL, generator=g) * lognormal((1, D_MODEL), g)  # columns: input features
    return dB, dA, B + dB, A


def masked_tensors(kind: str, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """{'B': (4096, 64), 'A': (64, 4096)} sparse deltas whose support is the given kind of mask."""
    dB, dA, B_new, A_old = lora_deltas(seed)
    if kind == "importance":
        IB, IA = importance_scores(dB, dA, B_new, A_old)
        mB, mA = topk_mask(IB, 1.0 - density), topk_mask(IA, 1.0 - density)
    else:  # uniformly random k-of-n
        rng = np.random.default_rng(seed)
        masks = []
        for t in (dB, dA):
            m = np.zeros(t.numel(), dtype=bool)
            m[rng.choice(t.numel(), size=round(density * t.numel()), replace=False)] = True
            masks.append(torch.from_numpy(m).reshape(t.shape))
        mB, mA = masks
    zero = torch.zeros(())
    return {"B": torch.where(mB, dB, zero), "A": torch.where(mA, dA, zero)}


def position_bytes(t: torch.Tensor, positions: str) -> int:
    n, idx = t.numel(), torch.nonzero(t.reshape(-1)).reshape(-1).numpy()
    if positions == "golomb":
        return len(rice_encode(idx, n)[1])
    if positions == "bitmap":
        return (n + 7) // 8
    return 4 * (n - idx.size)  # dense: the zeros it sends in place of positions


def size_rows() -> list[dict]:
    rows = []
    for kind in ("uniform", "importance"):
        for density in DENSITIES:
            for mat, t in masked_tensors(kind, density).items():
                n, k = t.numel(), int((t != 0).sum())
                log2c = information_bound_bits(n, k, 0)
                bound_bits = information_bound_bits(n, k, 32)
                for positions in ENCODINGS:
                    record = len(encode_tensor(t, positions))
                    pos = position_bytes(t, positions)
                    rows.append({
                        "mask": kind, "matrix": mat, "density": density, "n": n, "k": k,
                        "positions": positions, "record_bytes": record, "position_bytes": pos,
                        "header_bytes": record - pos - 4 * k, "log2_binom_bits": log2c,
                        "bound_bytes": bound_bits / 8,
                        "positions_over_log2c": 8 * pos / log2c,
                        "record_over_bound": 8 * record / bound_bits,
                    })
    return rows


def sweep() -> dict:
    """Golomb on random masks at every density 1.0%, 1.5%, ..., 30% (n = 262144)."""
    n, rng, ratios = D_MODEL * R, np.random.default_rng(1), {}
    for density in np.arange(0.01, 0.3001, 0.005):
        k = round(float(density) * n)
        idx = np.sort(rng.choice(n, size=k, replace=False))
        ratios[round(float(density), 4)] = 8 * len(rice_encode(idx, n)[1]) / information_bound_bits(n, k, 0)
    worst = max(ratios, key=ratios.get)
    return {"n": n, "ratios": ratios, "worst_density": worst, "worst_ratio": ratios[worst]}


def llama_payload(layers: int, density: float, seed: int = 0) -> Payload:
    """Llama-3.2-3B r = 64 LoRA deltas, each entry kept with probability `density`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod, (d_out, d_in) in MODULES.items():
            for part, shape in (("lora_A", (R, d_in)), ("lora_B", (d_out, R))):
                t = 1e-3 * torch.randn(shape, generator=g)
                t[torch.rand(shape, generator=g) >= density] = 0.0
                tensors[f"base_model.model.layers.{layer}.{mod}.{part}.weight"] = t
    return Payload(tensors, meta={"round": 1, "client": 0})


def best_of(repeat: int, fn):
    """(fastest wall time in seconds, last result) over `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def timing(layers: int) -> list[dict]:
    p = llama_payload(layers, 0.05)
    shapes = {k: tuple(t.shape) for k, t in p.tensors.items()}
    n = sum(t.numel() for t in p.tensors.values())
    out = []
    for positions in ("golomb", "bitmap"):
        encode_s, data = best_of(3, lambda: encode_payload(p, positions))
        decode_s, q = best_of(3, lambda: decode_payload(data, shapes))
        assert all(torch.equal(q.tensors[k], p.tensors[k]) for k in p.tensors)
        stats = payload_stats(p, positions)
        out.append({
            "layers": layers, "tensors": len(p.tensors), "entries": n, "density": 0.05,
            "positions": positions, "bytes": len(data), "bound_bytes": stats["bound_bytes"],
            "bytes_over_bound": len(data) / stats["bound_bytes"], "encode_s": encode_s, "decode_s": decode_s,
        })
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores (load average {load} at the start: timings are noisy when "
            f"the machine is shared), Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def markdown(res: dict) -> str:
    headers = {}
    for r in res["sizes"]:
        headers.setdefault(r["positions"], set()).add(r["header_bytes"])
    header_note = ", ".join(f"{p} {min(h)}-{max(h)}" if len(h) > 1 else f"{p} {min(h)}" for p, h in headers.items())
    lines = [
        "# Wire format: bytes against the information bound",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}",
        "",
        "n = 262144 per matrix (B 4096 x 64, A 64 x 4096), fp32 values. *pos/log2C*: bits spent on",
        "positions over log2 C(n, k) (dense: the zeros it sends). *rec/bound*: whole tensor record",
        f"(header + values + positions) over k * 32 + log2 C(n, k) bits. Header bytes: {header_note}.",
        "",
        "| mask | matrix | density | k | golomb pos/log2C | golomb rec/bound | bitmap pos/log2C "
        "| bitmap rec/bound | dense pos/log2C | dense rec/bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {}
    for r in res["sizes"]:
        by_key.setdefault((r["mask"], r["matrix"], r["density"]), {})[r["positions"]] = r
    for (mask, mat, density), enc in by_key.items():
        cells = []
        for positions in ENCODINGS:
            cells += [f"{enc[positions]['positions_over_log2c']:.3f}", f"{enc[positions]['record_over_bound']:.3f}"]
        lines.append(f"| {mask} | {mat} | {density:.0%} | {enc['golomb']['k']} | " + " | ".join(cells) + " |")
    sw = res["sweep"]
    lines += [
        "",
        f"Golomb sweep on uniformly random masks, densities 1.0%, 1.5%, ..., 30% (n = {sw['n']}): "
        f"worst positions/log2C = {sw['worst_ratio']:.4f} at {sw['worst_density']:.1%}; "
        f"best = {min(sw['ratios'].values()):.4f}.",
        "",
        "## Whole payload: Llama-3.2-3B LoRA r = 64, 5% of entries kept at random, fp32",
        "",
        "| positions | layers | tensors | entries | bytes | bound bytes | bytes/bound | encode s | decode s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in res["timing"]:
        lines.append(
            f"| {t['positions']} | {t['layers']} | {t['tensors']} | {t['entries']:,} | {t['bytes']:,} | "
            f"{t['bound_bytes']:,.0f} | {t['bytes_over_bound']:.4f} | {t['encode_s']:.2f} | {t['decode_s']:.2f} |"
        )
    lines.append("")
    lines.append("Times are the best of 3 runs. Decode includes every validation check and the")
    lines.append("expected-shape check of each tensor.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="time 2 layers instead of 28")
    args = ap.parse_args()
    note = machine()
    res = {
        "command": ".venv/bin/python benchmarks/wire.py" + (" --quick" if args.quick else ""),
        "machine": note,
        "sizes": size_rows(),
        "sweep": sweep(),
        "timing": timing(2 if args.quick else LAYERS),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "wire.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (RESULTS / "wire.md").write_text(md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
