"""How the FedSRD server step scales with the clients per round: exact factored, sketched, dense.

Llama-3.2-3B LoRA shapes (hidden 3072, intermediate 8192, 28 layers x q/k/v/o/gate/up/down, k and
v 1024 wide), r = 64, float32, 2 threads. Uploads are FedSRD's own (`sparse_upload` with the
paper's importance mask and adaptive ratio, encoded by the codec), so their density is what the
defaults produce. Two scopes:

* `gate`: one 8192 x 3072 module, m = 4 ... 256 distinct clients: time of every method, error of
  the exact (float32) and sketched targets against a float64 dense SVD_r reference, and the
  flat-spectrum residual check (sketch residual / optimal rank-r residual);
* `model`: all 196 modules; 16 distinct uploads cycled to m clients (the cost of a step does not
  depend on what the clients sent). Sketch for every m, exact where it fits in memory (m <= 16:
  today's exact step holds every decoded upload), dense not run (196 dense SVDs: about 15 min).

The step is an even round's (dA = pinv(B) T). "sketch" streams only the side of the target that
solve reads (`sketch_sides = "solve"`, the default), "sketch-both" both sides (the whole target
to first order); their accuracy is compared on what is broadcast, the solved factor.

Every cell runs in its own process, so "peak RSS" is that step's high-water mark above the
process's own before the step (the global state and the encoded uploads already loaded). The
decode column is the time to decode the round's uploads and nothing else, the floor every method
pays, decoded the way the runtime decodes them for a streaming step (into reused buffers,
`codec.DecodeBuffers`); the column beside it decodes each into fresh arrays, as the runtime did
before. Results are cached per cell in benchmarks/results/server_scaling.cells.json (rerun to
resume); the tables go to benchmarks/results/server_scaling.{json,md}.

    .venv/bin/python benchmarks/server_scaling.py            # 30-45 min on 2 cores
    .venv/bin/python benchmarks/server_scaling.py --quick    # m = 4, 16 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTER, KV, LAYERS, RANK = 3072, 8192, 1024, 28, 64
MODULES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
           "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "server_scaling.cells.json"
UPLOADS = Path(os.environ.get("FEDLOWRANK_BENCH_TMP", "/tmp/fedlowrank-server-scaling"))
DISTINCT_MODEL = 16
DENSE_MAX = 64  # beyond, the dense reference does not fit in 24 GB


def global_state(scope: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate": (INTER, HIDDEN)} if scope == "gate" else None
    names = [("gate", (INTER, HIDDEN))] if shapes else [(f"l{i}.{n}", s) for i in range(LAYERS) for n, s in MODULES.items()]
    out = {}
    for name, (d_out, d_in) in names:
        out[f"{name}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g) / d_in**0.5
        out[f"{name}.lora_B.weight"] = 0.02 * torch.randn(d_out, RANK, generator=g)
    return out


def make_uploads(scope: str, count: int, spread: float) -> list[Path]:
    """FedSRD's own uploads for `count` clients, encoded, cached on disk."""
    from fedlowrank.algorithms.base import ClientInfo
    from fedlowrank.algorithms.fedsrd import FedSRD
    from fedlowrank.codec import encode_payload

    folder = UPLOADS / f"{scope}-s{spread}"
    folder.mkdir(parents=True, exist_ok=True)
    glob = global_state(scope)
    alg = FedSRD()
    paths = []
    for i in range(count):
        p = folder / f"{i}.bin"
        if not p.exists():
            g = torch.Generator().manual_seed(1000 + i)
            trained = {k: v + spread * v.std() * torch.randn(v.shape, generator=g) for k, v in glob.items()}
            payload = alg.client_payload(glob, trained, ClientInfo(2, i, 0))
            payload.meta["round"] = 2
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(encode_payload(payload))
            tmp.replace(p)
            del trained, payload
        paths.append(p)
    return paths


def density(scope: str, paths: list[Path]) -> float:
    from fedlowrank.codec import decode_payload

    shapes = {k: tuple(v.shape) for k, v in global_state(scope).items()}
    p = decode_payload(paths[0].read_bytes(), shapes)
    nnz = sum(int(torch.count_nonzero(t)) for t in p.tensors.values())
    return nnz / sum(t.numel() for t in p.tensors.values())


# --- one cell, in a child process ----------------------------------------------------------------
def cell(scope: str, method: str, m: int, spread: float) -> dict:
    from fedlowrank.algorithms import make_algorithm
    from fedlowrank.algorithms.aggregation import aggregate_encoded
    from fedlowrank.algorithms.base import RoundInfo
    from fedlowrank.codec import DecodeBuffers, decode_payload

    torch.set_num_threads(2)
    glob = global_state(scope)
    shapes = {k: tuple(v.shape) for k, v in glob.items()}
    distinct = m if scope == "gate" else min(m, DISTINCT_MODEL)
    blobs = [p.read_bytes() for p in make_uploads(scope, distinct, spread)]
    order = [blobs[i % distinct] for i in range(m)]
    encoded_mb = sum(len(b) for b in order) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method in ("decode", "decode-fresh"):  # into reused buffers (what a streaming step gets), or fresh arrays
        buffers = DecodeBuffers() if method == "decode" else None
        for b in order:
            decode_payload(b, shapes, buffers=buffers)
        out = {}
    else:
        sides = {"sketch": {"sketch_sides": "solve"}, "sketch-both": {"sketch_sides": "both"}}.get(method, {})
        opts = {"method": "sketch" if sides else method, "server_dtype": "float32", **sides}
        alg = make_algorithm("fedsrd", opts)
        # as the runtime feeds it: decoded one at a time, into reused buffers where the step allows
        bc, _ = aggregate_encoded(alg.aggregator(glob, [1] * m, RoundInfo(2, 0), {}), order,
                                  lambda b, buffers: decode_payload(b, shapes, buffers=buffers))  # fmt: skip
        out = {k: v for k, v in bc.stats.items() if k in ("sketched", "sketch_error_max", "sketch_one_side")}
    seconds = time.perf_counter() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"seconds": seconds, "peak_rss_mb": grew, "encoded_mb": encoded_mb, **out}


def errors(m: int, spread: float) -> dict:
    """Gate module: exact (float32) and sketched targets against a float64 dense SVD_r reference,
    the residual ratio ||W - approx_r|| / ||W - SVD_r(W)||, and the even round's solved factor
    dA = pinv(B) T of each (the two-sided and the one-sided sketch) against the reference's."""
    from fedlowrank.algorithms.fedsrd import target
    from fedlowrank.codec import decode_payload
    from fedlowrank.lora import truncated_svd_of_sum
    from fedlowrank.sketch import ProductSketch

    torch.set_num_threads(2)
    glob = global_state("gate")
    b_key, a_key = "gate.lora_B.weight", "gate.lora_A.weight"
    B, A = glob[b_key], glob[a_key]
    shapes = {k: tuple(v.shape) for k, v in glob.items()}
    ups = [decode_payload(p.read_bytes(), shapes) for p in make_uploads("gate", m, spread)]
    dBs, dAs = [u.tensors[b_key] for u in ups], [u.tensors[a_key] for u in ups]
    w = [1.0 / m] * m
    W = sum(wi * (B + dB).double() @ (A + dA).double() for wi, dB, dA in zip(w, dBs, dAs))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
    BA = B.double() @ A.double()
    T_ref = best - BA
    opt_res = float((W - best).norm())
    L, R = target(B, A, [B + x for x in dBs], [A + x for x in dAs], w, efficient=False)
    T_exact = (L @ R).double()
    results = {}
    for sides in ("both", "left"):
        sk = ProductSketch(B, A, seed=1, sides=sides)
        for dB, dA, wi in zip(dBs, dAs, w):
            sk.add(dB, dA, wi)
        Lw, Rw = sk.factors()
        left, right = truncated_svd_of_sum([Lw], [Rw], [1.0], RANK)
        results[sides] = (left @ right).double(), sk.first_order_error(left, right)
    approx = results["both"][0]
    pinvB = torch.linalg.pinv(B.double())
    dA_ref = pinvB @ T_ref

    def solve_error(T):
        return float((pinvB @ T - dA_ref).norm() / dA_ref.norm())

    tn = float(T_ref.norm())
    return {
        "exact_fp32_solve_error": solve_error(T_exact),
        "sketch_solve_error": solve_error(approx - BA),
        "one_side_solve_error": solve_error(results["left"][0] - BA),
        "one_side_error_estimate": results["left"][1],
        "one_side_error": float((results["left"][0] - BA - T_ref).norm()) / tn,
        "exact_fp32_error": float((T_exact - T_ref).norm()) / tn,
        "sketch_error": float((approx - BA - T_ref).norm()) / tn,
        "sketch_error_estimate": results["both"][1],
        "sketch_residual_ratio": float((W - approx).norm()) / opt_res,
        "exact_residual_ratio": float((W - (T_exact + BA)).norm()) / opt_res,
    }


# --- the driver ---------------------------------------------------------------------------------
def run_cell(key: str, args: list[str], cache: dict, timeout: float) -> dict:
    if key in cache:
        return cache[key]
    cmd = [sys.executable, __file__, "--cell", *args]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        res = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"failed": out.stderr[-300:]}
    except subprocess.TimeoutExpired:
        res = {"failed": f"over {timeout:.0f} s"}
    res["wall"] = time.perf_counter() - t0
    cache[key] = res
    CACHE.write_text(json.dumps(cache, indent=1))
    print(f"  {key}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()})}", flush=True)
    return res


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scope", choices=("gate", "model", "all"), default="all", help="run only these cells (the tables use every cached one)")
    ap.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        kind, *rest = args.cell
        res = errors(int(rest[0]), float(rest[1])) if kind == "errors" else cell(kind, rest[0], int(rest[1]), float(rest[2]))
        print(json.dumps(res))
        return
    ms = [4, 16] if args.quick else [4, 16, 64, 128, 256]
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    load0 = os.getloadavg()
    gate_rows, model_rows = [], []
    def get(scope, key, cell_args, timeout):
        if args.scope in (scope, "all"):
            return run_cell(key, cell_args, cache, timeout)
        return cache.get(key, {"failed": "not run"})

    print("gate module (8192 x 3072, r = 64)", flush=True)
    for m in ms:
        row = {"m": m}
        # dense: the paper's reference builds every client's d_out x d_in product (100 MB each): 13 GB at m = 128
        for method in ("decode", "factored", "sketch", "sketch-both") + (("dense",) if m <= DENSE_MAX else ()):
            row[method] = get("gate", f"gate/{method}/{m}", ["gate", method, str(m), "0.1"], 1800)
        row["errors"] = get("gate", f"gate/errors/{m}", ["errors", str(m), "0.1"], 1800)
        row["flat"] = get("gate", f"gate/flat/{m}", ["errors", str(m), "1.0"], 1800)
        gate_rows.append(row)
    print("whole model (196 modules, r = 64)", flush=True)
    for m in ms:
        row = {"m": m}
        for method in ("decode", "decode-fresh", "sketch", "sketch-both") + (("factored",) if m <= 16 else ()):
            row[method] = get("model", f"model/{method}/{m}", ["model", method, str(m), "0.1"], 3600)
        model_rows.append(row)
    gate_density = density("gate", make_uploads("gate", 1, 0.1))
    model_density = density("model", make_uploads("model", 1, 0.1))
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": 2,
            "load_before": load0, "load_after": os.getloadavg(), "gate_density": gate_density,
            "model_density": model_density, "state_mb_model": sum(v.numel() for v in global_state("model").values()) * 4 / 2**20}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_scaling.json").write_text(json.dumps({"meta": meta, "gate": gate_rows, "model": model_rows}, indent=1))

    def sec(c):
        return fmt(c.get("seconds")) if "seconds" in c else c.get("failed", "-")[:20]

    lines = ["# Server step scaling (benchmarks/server_scaling.py)", "",
             f"torch {meta['torch']}, 2 threads, float32; load average {load0[0]:.2f} before, {meta['load_after'][0]:.2f} after. "
             f"FedSRD's default uploads keep {100 * gate_density:.1f}% (gate) / {100 * model_density:.1f}% (model) of the entries. "
             f"Global state of the whole model: {meta['state_mb_model']:.0f} MB.", "",
             "## One gate module (8192 x 3072, r = 64)", "",
             "| m | decode s | exact factored s | sketch (one side) s | sketch (both sides) s | dense s | exact peak MB | sketch peak MB | "
             "target err: exact fp32 | both | both estimate | one side | solved dA err: exact fp32 | both | one side | one-side estimate | "
             "flat: both / optimal residual |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in gate_rows:
        e, f = r["errors"], r["flat"]
        lines.append(f"| {r['m']} | {sec(r['decode'])} | {sec(r['factored'])} | {sec(r['sketch'])} | {sec(r['sketch-both'])} | "
                     f"{sec(r['dense']) if 'dense' in r else 'does not fit'} | "
                     f"{fmt(r['factored'].get('peak_rss_mb'), 0)} | {fmt(r['sketch'].get('peak_rss_mb'), 0)} | "
                     f"{fmt(e.get('exact_fp32_error'))} | {fmt(e.get('sketch_error'))} | {fmt(e.get('sketch_error_estimate'))} | "
                     f"{fmt(e.get('one_side_error'))} | {fmt(e.get('exact_fp32_solve_error'))} | {fmt(e.get('sketch_solve_error'))} | "
                     f"{fmt(e.get('one_side_solve_error'))} | {fmt(e.get('one_side_error_estimate'))} | "
                     f"{fmt(f.get('sketch_residual_ratio'), 4)} |")  # fmt: skip
    lines += ["", "## The whole 3B-shaped LoRA set (196 modules, r = 64)", "",
              "| m | encoded uploads MB | decode s | decode into fresh arrays s | sketch (one side) s | one side / decode | "
              "sketch peak MB | sketch (both sides) s | both / decode | exact factored s | exact peak MB |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def ratio(a, b):
        return a["seconds"] / b["seconds"] if "seconds" in a and "seconds" in b else None

    for r in model_rows:
        d, s, both, x = r["decode"], r["sketch"], r["sketch-both"], r.get("factored", {})
        lines.append(f"| {r['m']} | {fmt(d.get('encoded_mb'), 0)} | {sec(d)} | {sec(r['decode-fresh'])} | {sec(s)} | {fmt(ratio(s, d))} | "
                     f"{fmt(s.get('peak_rss_mb'), 0)} | {sec(both)} | {fmt(ratio(both, d))} | "
                     f"{sec(x) if x else 'not run'} | {fmt(x.get('peak_rss_mb'), 0) if x else '-'} |")  # fmt: skip
    lines += ["", "Decode: the round's uploads decoded one after another into reused buffers (codec.DecodeBuffers), as the "
              "runtime decodes them for a streaming step (the sketch, FedAvg's means); into fresh arrays: each upload "
              "a new zeroed copy, as before (its cost is mostly the page faults of fresh memory).",
              "", "Peak MB: the step's resident high-water mark above the process's before it (global state and encoded "
              "uploads already loaded). Target errors: relative Frobenius error of SVD_r(W) - B A against a float64 "
              "dense reference; solved dA errors: of this even round's pinv(B) T, what is broadcast; estimates: the "
              "sketch's own probe estimate (what metrics.jsonl records as `sketch_error_max`; one-sided, of the side "
              "its solve reads). Flat: client deltas as large as the factors (spread 1.0)."]  # fmt: skip
    (RESULTS / "server_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
