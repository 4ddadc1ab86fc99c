"""Personalisation (issue 5, experiment 5): pFedPara against FedAvg and FedPer on Fashion-MNIST.

A pathological label split: 20 clients, each holding 2 classes (client i: classes i and i + 1
mod 10), each client with a test split of its own classes. Three methods on the small VGG-GN:

  fedavg     one global model (the plain CNN), evaluated on each client's own test split;
  fedper     FedAvg of the body, the classifier head kept on each client (Arivazhagan et al. 2019);
  pfedpara   FedAvg on a pFedPara model, W = W1 * (W2 + 1) in every convolution, W2 local
             (Hyeon-Woo et al. 2022), gamma 0.5;
  pfedpara-head  the same with the linear head factorised too (its W2 local as well).

Preset: configs/fashion-personalization.toml (sim.evaluation = "clients" for all three). Runs go
to runs/results/personalization/<method>; finished runs are skipped, interrupted ones resumed.
After the runs, each client's final model (the global state plus its own local keys) is
evaluated on its own test split: mean, standard deviation, min and max over the 20 clients.
Writes benchmarks/results/personalization.{json,md} and prints the table.

    .venv/bin/python benchmarks/personalization.py            # about 13 min on one core
    .venv/bin/python benchmarks/personalization.py --report   # tables from finished runs only
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from fedlowrank.runconfig import load_run_config
from fedlowrank.runs.experiment import run_experiment
from fedlowrank.runs.rundir import RunDir
from fedlowrank.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "results" / "personalization"
PRESET = "fashion-personalization"
MB = 1e6

METHODS = {  # method: --set overrides of the preset
    "fedavg": ["algorithms=[\"fedavg\"]", "task.model=plain"],
    "fedper": ["algorithms=[\"fedper\"]", "task.model=plain"],
    "pfedpara": ["algorithms=[\"fedavg\"]", "task.model=pfedpara"],
    "pfedpara-head": ["algorithms=[\"fedavg\"]", "task.model=pfedpara", "task.fedpara_head=true"],
}


def overrides(method: str) -> list[str]:
    return METHODS[method] + [f"name=personalization-{method}"]


def command(method: str) -> str:
    sets = " ".join(f"--set {shlex.quote(s)}" for s in overrides(method))
    return f"fedlowrank run {PRESET} {sets} --out runs/results/personalization/{method}"


def run_all(report_only: bool) -> None:
    for method in METHODS:
        out = RUNS / method
        if RunDir(out).is_complete():
            continue
        if report_only:
            print(f"not finished, left out: {out}", file=sys.stderr)
            continue
        cfg, _ = load_run_config(PRESET, overrides(method))
        print(f"running {out.relative_to(ROOT)} ...", flush=True)
        t0 = time.perf_counter()
        run_experiment(cfg, out, resume=(out / "config.toml").exists())
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)


def per_client_accuracy(method: str) -> tuple[list[float], dict]:
    """Each client's accuracy on its own test split with its final model (global + own local keys)."""
    cfg, _ = load_run_config(PRESET, overrides(method))
    task = make_task(cfg.task_name, cfg.task, cfg.seed).build()
    state, _ = RunDir(RUNS / method).load_checkpoint()
    accs = []
    for i in range(task.num_clients):
        task.load({**state.global_state, **state.local.get(i, {})})
        accs.append(task.evaluate(i)["accuracy"])
    local = sorted({k for s in state.local.values() for k in s})
    params = {
        "parameters": sum(p.numel() for p in task.parameters().values()),
        "local_parameters": sum(state.global_state[k].numel() for k in local),
    }
    return accs, params


def collect() -> list[dict]:
    rows = []
    for method in METHODS:
        rd = RunDir(RUNS / method)
        if not rd.is_complete():
            continue
        summary = json.loads(rd.summary_json.read_text())
        cfg, _ = load_run_config(PRESET, overrides(method))
        accs, params = per_client_accuracy(method)
        records = rd.read_metrics()
        participations = sum(r["accepted"] for r in records)
        rows.append(
            {
                "method": method,
                **params,
                "rounds": summary["rounds"],
                "clients": len(accs),
                "client_accuracy": accs,
                "mean_accuracy": statistics.mean(accs),
                "std_accuracy": statistics.pstdev(accs),
                "min_accuracy": min(accs),
                "max_accuracy": max(accs),
                "logged_final_accuracy": summary["accuracy"],  # sample-weighted, from the run
                "upload_mb_per_client_round": summary["upload_bytes"] / MB / participations,
                "download_mb_per_client_round": summary["download_bytes"] / MB / participations,
                "total_mb": (summary["upload_bytes"] + summary["download_bytes"]) / MB,
                "wall_seconds": summary["wall_seconds"],
                "command": command(method),
                "evaluation": cfg.sim.evaluation,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Personalisation: pFedPara, FedPer and FedAvg on Fashion-MNIST, 2 labels per client",
        "",
        "Generated by `benchmarks/personalization.py` (one seed, one torch thread). 20 clients, 5 per",
        "round; accuracy per client on its own test split (about 200 images of its 2 classes) with",
        "its final model; mean, population std, min and max over the 20 clients. MB = 10^6 bytes of",
        "encoded payloads; per client per round = over the clients that took part.",
        "",
        "```bash",
        *[r["command"] for r in rows],
        "```",
        "",
        "| method | parameters | local (never sent) | rounds | mean acc % | std | min % | max % | MB up / client / round | MB down / client / round | total MB | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['parameters']:,} | {r['local_parameters']:,} | {r['rounds']} | "
            f"{100 * r['mean_accuracy']:.2f} | {100 * r['std_accuracy']:.2f} | {100 * r['min_accuracy']:.2f} | "
            f"{100 * r['max_accuracy']:.2f} | {r['upload_mb_per_client_round']:.4f} | "
            f"{r['download_mb_per_client_round']:.4f} | {r['total_mb']:.1f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="only tabulate finished runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_all(args.report)
    rows = collect()
    if not rows:
        sys.exit("no finished runs")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "personalization.json").write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    md = markdown(rows)
    (RESULTS / "personalization.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
