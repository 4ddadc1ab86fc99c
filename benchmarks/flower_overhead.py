"""The Flower simulation engine against the in-process runtime, as a user runs them.

Runs `fedlowrank run PRESET --set task.num_clients=N --set sim.rounds=R --quiet` twice in
subprocesses, once in-process and once with `--runtime flower` (one engine start for every
algorithm), alternating `--repeats` times, and reports the wall time of each (start-up and
building the task included), their ratio, the lines each wrote to stderr, and whether the two
ledgers agree (bytes per round and accuracy of every algorithm).

    .venv/bin/python benchmarks/flower_overhead.py                 # digits-all, 5 rounds, 4 clients

Writes benchmarks/results/flower_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def _run(preset: str, sets: list[str], out: Path, flower: bool) -> tuple[float, list[str]]:
    cmd = [str(BIN / "fedlowrank"), "run", preset, *[a for s in sets for a in ("--set", s)], "--out", str(out), "--quiet"]
    if flower:
        cmd += ["--runtime", "flower"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall, [line for line in p.stderr.splitlines() if line.strip()]


def _ledgers_agree(a: Path, b: Path) -> bool:
    runs = json.loads((a / "summary.json").read_text())["runs"]
    for r in runs:
        la = [json.loads(x) for x in (a / r["algorithm"] / "metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(x) for x in (b / r["algorithm"] / "metrics.jsonl").read_text().splitlines()]
        for x, y in zip(la, lb, strict=True):
            if (x["upload_bytes"], x["download_bytes"]) != (y["upload_bytes"], y["download_bytes"]):
                return False
            if "eval" in x and abs(x["eval"]["accuracy"] - y["eval"]["accuracy"]) > 1e-9:
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits-all")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    sets = [f"task.num_clients={args.clients}", f"sim.rounds={args.rounds}"]
    tmp = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    rows = []
    for k in range(args.repeats):
        inproc, err_i = _run(args.preset, sets, tmp / f"inproc-{k}", flower=False)
        flower, err_f = _run(args.preset, sets, tmp / f"flower-{k}", flower=True)
        agree = _ledgers_agree(tmp / f"flower-{k}", tmp / f"inproc-{k}")
        rows.append({"repeat": k, "in_process_s": inproc, "flower_s": flower, "ratio": flower / inproc,
                     "stderr_lines_in_process": len(err_i), "stderr_lines_flower": len(err_f),
                     "ledgers_agree": agree, "stderr_flower": err_f[:20]})  # fmt: skip
        print(f"repeat {k}: in-process {inproc:.1f} s, Flower {flower:.1f} s ({flower / inproc:.2f}x), "
              f"stderr {len(err_i)} / {len(err_f)} lines, ledgers agree: {agree}", flush=True)  # fmt: skip
    load = os.getloadavg()[0]
    meta = {"preset": args.preset, "clients": args.clients, "rounds": args.rounds, "load_average_1min": load,
            "python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flower_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Flower simulation engine vs in-process: `{args.preset}`, {args.rounds} rounds, {args.clients} clients",
             "", f"`.venv/bin/python benchmarks/flower_overhead.py` on {meta['date']}, {meta['cpus']} CPUs, "
             f"load average {load:.1f} at the end. Wall times include start-up and building the task.", "",
             "| repeat | in-process s | Flower s | ratio | stderr lines (in-process / Flower) | ledgers agree |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['repeat']} | {r['in_process_s']:.1f} | {r['flower_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['stderr_lines_in_process']} / {r['stderr_lines_flower']} | {r['ledgers_agree']} |")  # fmt: skip
    (RESULTS / "flower_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
