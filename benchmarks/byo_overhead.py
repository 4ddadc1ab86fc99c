"""The generic `causal-lm` path against `lm-domains` on the same rows: time per round.

`lm-domains`' packaged rows (one client per domain) are written to JSONL files (training rows
with a `client` column, held-out rows as `eval_data`), and the same model, LoRA and training
settings run once through each task, in one process, alternating, `--repeats` times. Reported:
the median seconds per round (training + server + evaluation) of each and their ratio.

    .venv/bin/python benchmarks/byo_overhead.py                 # tiny model, 3 rounds, 3 repeats
    .venv/bin/python benchmarks/byo_overhead.py --model smollm2 --rounds 2 --repeats 1

Writes benchmarks/results/byo_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedlowrank.algorithms import make_algorithm
from fedlowrank.sim import SimConfig, Simulation
from fedlowrank.tasks import make_task

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    common = {"model": args.model, "lora_rank": 16, "local_steps": 5, "batch_size": 4, "seq_len": 256}
    domains = make_task("lm-domains", {**common, "train_examples": 32, "eval_examples": 8, "ood_domains": []}, 0).build()
    tmp = Path(tempfile.mkdtemp(prefix="byo-overhead-"))
    from fedlowrank.data.domains import load_domain

    train, held = [], []
    for d in domains.config.domains:
        t, e = load_domain(d, 32, 8, 0)
        train += [{"client": d, "prompt": x.prompt, "completion": x.completion} for x in t]
        held += [{"client": d, "prompt": x.prompt, "completion": x.completion} for x in e]
    _write(train, tmp / "train.jsonl")
    _write(held, tmp / "eval.jsonl")
    generic = make_task("causal-lm", {**common, "data": str(tmp / "train.jsonl"), "eval_data": str(tmp / "eval.jsonl"),
                                      "client_column": "client"}, 0).build()  # fmt: skip
    times: dict[str, list[float]] = {"lm-domains": [], "causal-lm": []}
    for _ in range(args.repeats):
        for label, task in (("lm-domains", domains), ("causal-lm", generic)):
            sim = Simulation(task, make_algorithm("fedavg"), SimConfig(rounds=args.rounds))
            t0 = time.perf_counter()
            sim.run()
            times[label].append((time.perf_counter() - t0) / args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "rounds": args.rounds, "repeats": args.repeats, "seconds_per_round": med,
              "ratio": med["causal-lm"] / med["lm-domains"], "load": os.getloadavg()[0],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": sys.version.split()[0]}  # fmt: skip
    md = (
        "# causal-lm against lm-domains on the same rows\n\n"
        f"Written by `benchmarks/byo_overhead.py --model {args.model} --rounds {args.rounds} --repeats {args.repeats}` "
        f"(FedAvg, 4 clients, 32 rows each, 5 local steps of 4, LoRA r16 all-linear; load average {result['load']:.2f}).\n\n"
        "| task | s / round (median) |\n|---|---|\n"
        f"| lm-domains | {med['lm-domains']:.3f} |\n| causal-lm | {med['causal-lm']:.3f} |\n\n"
        f"causal-lm / lm-domains: {result['ratio']:.3f}\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "byo_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "byo_overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
