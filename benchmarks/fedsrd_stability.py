"""FedSRD stability: the paper's FedSRD / FedSRD-e, each fixing option alone, and fedsrd-plus.

For every task of the grid, every seed and every method, one run (resumable: a finished run is
read back, a killed one continues from its checkpoint), then a table per task:

* final and best metric per seed, mean +- std over seeds, the worst seed's gap to FedAvg;
* bytes up / down per run (mean over seeds) and as % of FedAvg's; the share of the downloads
  that were catch-up payloads (clients that missed rounds);
* rounds until FedAvg's final metric is reached (first evaluation at least as good);
* the factor norms' maximum over the run, and the condition number of the factor solved against
  (per round the largest over modules; the median over rounds >= 3, the worst seed: round 2
  solves against a B that the round-1 download left rank-deficient).

Tasks (the issue's grid; `--tasks` picks a subset):

    digits       digits-all settings, 50 rounds, seeds 0-4 (+ 200 rounds of FedSRD and fedsrd-plus)
    digits-budget  the same, seeds 0-2: fedsrd-plus with its upload and / or download made dense,
                 FedAvg with FedSRD's top-k upload (where digits' gap comes from)
    news-topics  news-topics-all settings, 20 rounds, seeds 0-2
    lm-tiny      lm-domains tables preset with model = "tiny", 6 rounds, seeds 0-2
    lm-smollm2   lm-domains tables preset (SmolLM2-135M), 12 rounds, seeds 0-1
    lm-paper     lm-domains, lr 1e-4, 10 local steps, 24 rounds, seed 0

Writes benchmarks/results/fedsrd_stability.{json,md}; run directories go to
runs/results/fedsrd-stability/ (git-ignored).

    .venv/bin/python benchmarks/fedsrd_stability.py --tasks digits news-topics lm-tiny
    .venv/bin/python benchmarks/fedsrd_stability.py --tables-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedlowrank.runconfig import parse_run_config, preset_dirs
from fedlowrank.runs.experiment import run_experiment
from fedlowrank.runs.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "results" / "fedsrd-stability"
RESULTS = ROOT / "benchmarks" / "results"

# label -> (base algorithm, options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "fedsrd": ("fedsrd", {}),
    "fedsrd-e": ("fedsrd-e", {}),
    "fedsrd-plus": ("fedsrd-plus", {}),
    "fedsrd-e-plus": ("fedsrd-e-plus", {}),
    "+rebalance": ("fedsrd", {"rebalance": True}),
    "+float64": ("fedsrd", {"server_dtype": "float64"}),
    "+tikhonov": ("fedsrd", {"solve": "tikhonov"}),
    "+truncated": ("fedsrd", {"solve": "truncated"}),
    "+upload-feedback": ("fedsrd", {"upload_feedback": True}),
    "+download-feedback": ("fedsrd", {"download_feedback": True, "download_rescale": False}),
    "+unscaled-download": ("fedsrd", {"download_rescale": False}),
    "+sampled-upload": ("fedsrd", {"upload_mask": "importance-sampled"}),
}
# digits-budget: where digits' gap comes from (fedsrd-plus with one transfer made dense at a time)
BUDGET_METHODS = {
    "fedavg-importance": ("fedavg-importance", {}),
    "plus-dense-transfers": ("fedsrd-plus", {"upload_mask": "none", "download_drop": 0.0}),
    "plus-dense-upload": ("fedsrd-plus", {"upload_mask": "none"}),
    "plus-dense-download": ("fedsrd-plus", {"download_drop": 0.0}),
    "plus-topk-feedback-dense-download": ("fedsrd-plus", {"upload_mask": "importance", "upload_feedback": True,
                                                          "download_drop": 0.0}),
    "srd-dense-transfers": ("fedsrd", {"upload_mask": "none", "download_drop": 0.0}),
}  # fmt: skip
STABILITY_METHODS = list(METHODS)  # every task's methods unless it names its own
METHODS.update(BUDGET_METHODS)
PAPER_METHODS = ["fedavg", "fedsrd", "fedsrd-e", "fedsrd-plus", "fedsrd-e-plus"]

# task -> (preset, overrides of the raw config, seeds, metric, higher is better)
TASKS: dict[str, dict[str, Any]] = {
    "digits": {"preset": "digits-all", "set": {"sim": {"rounds": 50, "eval_every": 5}},
               "seeds": [0, 1, 2, 3, 4], "metric": "accuracy", "higher": True},
    "news-topics": {"preset": "news-topics-all", "set": {"sim": {"rounds": 20, "eval_every": 2}},
                    "seeds": [0, 1, 2], "metric": "accuracy", "higher": True},
    "lm-tiny": {"preset": "lm-domains-fedsrd-tables", "set": {"task": {"model": "tiny"}, "sim": {"rounds": 6, "eval_every": 2}},
                "seeds": [0, 1, 2], "metric": "in_domain_ppl", "higher": False},
    "digits-budget": {"preset": "digits-all", "set": {"sim": {"rounds": 50, "eval_every": 5}},
                      "seeds": [0, 1, 2], "metric": "accuracy", "higher": True,
                      "methods": ["fedavg", "fedsrd-plus", *BUDGET_METHODS]},
    "lm-smollm2": {"preset": "lm-domains-fedsrd-tables", "set": {"sim": {"rounds": 12, "eval_every": 2}},
                   "seeds": [0, 1], "metric": "in_domain_ppl", "higher": False, "methods": PAPER_METHODS},
    "lm-paper": {"preset": "lm-domains-fedsrd-tables",
                 "set": {"task": {"lr": 1e-4, "local_steps": 10}, "sim": {"rounds": 24, "eval_every": 4}},
                 "seeds": [0], "metric": "in_domain_ppl", "higher": False, "methods": PAPER_METHODS},
}  # fmt: skip
LONG = {"task": "digits", "rounds": 200, "methods": ["fedavg", "fedsrd", "fedsrd-plus"], "seeds": [0]}


def _preset(name: str) -> dict[str, Any]:
    for d in preset_dirs():
        p = Path(d) / f"{name}.toml"
        if p.exists():
            return tomllib.loads(p.read_text())
    raise SystemExit(f"preset {name!r} not found")


def run_config(task: str, method: str, seed: int, rounds: int | None = None):
    spec = TASKS[task]
    raw = _preset(spec["preset"])
    for table, values in spec["set"].items():
        raw.setdefault(table, {}).update(values)
    if rounds is not None:
        raw["sim"]["rounds"] = rounds
        raw["sim"]["eval_every"] = max(1, rounds // 20)
    base, options = METHODS[method]
    raw["seed"] = seed
    raw["name"] = f"fedsrd-stability-{task}"
    raw["algorithms"] = [method]
    raw["algorithm"] = {method: {"base": base, **options}} if method != base else {}
    return parse_run_config(raw)


def run_dir(task: str, method: str, seed: int, rounds: int | None = None) -> Path:
    tail = f"-r{rounds}" if rounds else ""
    return RUNS / f"{task}{tail}" / f"seed{seed}" / method.lstrip("+")


def run_one(task: str, method: str, seed: int, rounds: int | None = None) -> None:
    d = run_dir(task, method, seed, rounds)
    if RunDir(d).is_complete():
        return
    t0 = time.perf_counter()
    run_experiment(run_config(task, method, seed, rounds), d, resume=(d / "config.toml").exists())
    print(f"  {task} seed {seed} {method}: {time.perf_counter() - t0:.0f} s", flush=True)


def methods_of(task: str) -> list[str]:
    return TASKS[task].get("methods", STABILITY_METHODS)


# --------------------------------------------------------------------------------------------
# reading the ledgers


def summarise_run(d: Path, metric: str, higher: bool) -> dict[str, Any] | None:
    rd = RunDir(d)
    if not rd.is_complete():
        return None
    records = rd.read_metrics()
    evals = [(r["round"], r["eval"][metric]) for r in records if "eval" in r]
    vals = [v for _, v in evals]
    best = max(vals) if higher else min(vals)
    up = sum(r["upload_bytes"] for r in records)
    down = sum(r["download_bytes"] for r in records)
    catchup = sum(c["download_bytes"] - r.get("broadcast_bytes", 0) for r in records for c in r["per_client"]
                  if c.get("catchup") in ("state", "deltas"))  # fmt: skip
    diag = [r.get("diagnostics", {}) for r in records]
    norms = [max(x.get("B_norm_after_max", 0.0), x.get("A_norm_after_max", 0.0)) for x in diag]
    conds = [x["solve_cond_max"] for r, x in zip(records, diag) if "solve_cond_max" in x and r["round"] >= 3]
    return {
        "final": vals[-1], "best": best, "evals": evals, "upload_bytes": up, "download_bytes": down,
        "catchup_bytes": max(catchup, 0), "factor_norm_max": max(norms) if norms else 0.0,
        "cond_median": statistics.median(conds) if conds else None,
        "diverged": not all(math.isfinite(v) for v in vals),
    }  # fmt: skip


def _reached(evals, target: float, higher: bool) -> int | None:
    for r, v in evals:
        if (v >= target) if higher else (v <= target):
            return r
    return None


def _fmt(x: float, metric: str) -> str:
    return f"{100 * x:.1f}" if metric == "accuracy" else f"{x:.2f}"


def task_table(task: str, seeds: list[int], methods: list[str], rounds: int | None = None) -> dict[str, Any]:
    spec = TASKS[task]
    metric, higher = spec["metric"], spec["higher"]
    runs = {m: {s: summarise_run(run_dir(task, m, s, rounds), metric, higher) for s in seeds} for m in methods}
    fedavg = runs.get("fedavg", {})
    rows = []
    for m in methods:
        done = {s: r for s, r in runs[m].items() if r is not None}
        if not done:
            continue
        finals = [r["final"] for r in done.values()]
        row: dict[str, Any] = {
            "method": m, "seeds": sorted(done), "final": finals, "best": [r["best"] for r in done.values()],
            "final_mean": statistics.fmean(finals), "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "upload_bytes": statistics.fmean(r["upload_bytes"] for r in done.values()),
            "download_bytes": statistics.fmean(r["download_bytes"] for r in done.values()),
            "catchup_bytes": statistics.fmean(r["catchup_bytes"] for r in done.values()),
            "factor_norm_max": max(r["factor_norm_max"] for r in done.values()),
            "cond_median": max((r["cond_median"] for r in done.values() if r["cond_median"] is not None), default=None),
        }  # fmt: skip
        paired = [s for s in done if fedavg.get(s) is not None]
        if paired:
            ref_final = [fedavg[s]["final"] for s in paired]
            gaps = [(done[s]["final"] - fedavg[s]["final"]) * (1 if higher else -1) for s in paired]
            if not higher:  # relative perplexity gap
                gaps = [g / fedavg[s]["final"] for g, s in zip(gaps, paired)]
            row["gap_mean"] = statistics.fmean(gaps)
            row["gap_worst"] = min(gaps)
            total = statistics.fmean(fedavg[s]["upload_bytes"] + fedavg[s]["download_bytes"] for s in paired)
            row["bytes_pct_of_fedavg"] = 100 * (row["upload_bytes"] + row["download_bytes"]) / total
            reach = [_reached(done[s]["evals"], t, higher) for s, t in zip(paired, ref_final)]
            row["rounds_to_fedavg_final"] = reach
        rows.append(row)
    return {"task": task, "metric": metric, "higher": higher, "rounds": rounds, "rows": rows}


def markdown(table: dict[str, Any]) -> str:
    metric = table["metric"]
    unit = "accuracy %" if metric == "accuracy" else "in-domain ppl"
    gap_unit = "points" if metric == "accuracy" else "% rel."
    lines = [
        f"| method | final {unit} (per seed) | mean +- std | best (per seed) | gap to FedAvg, mean / worst ({gap_unit}) "
        "| MB up | MB down | catch-up MB | bytes % of FedAvg | rounds to FedAvg's final | max factor norm | cond. solved against |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scale = 100  # gaps: accuracy points, or percent of FedAvg's perplexity
    for r in table["rows"]:
        gap = (f"{scale * r['gap_mean']:+.1f} / {scale * r['gap_worst']:+.1f}" if "gap_mean" in r else "")
        reach = ", ".join("-" if x is None else str(x) for x in r.get("rounds_to_fedavg_final", []))
        cond = "" if r["cond_median"] is None else f"{r['cond_median']:.3g}"
        lines.append(
            f"| {r['method']} | {', '.join(_fmt(x, metric) for x in r['final'])} | {_fmt(r['final_mean'], metric)} +- "
            f"{_fmt(r['final_std'], metric)} | {', '.join(_fmt(x, metric) for x in r['best'])} | {gap} | "
            f"{r['upload_bytes'] / 1e6:.2f} | {r['download_bytes'] / 1e6:.2f} | {r['catchup_bytes'] / 1e6:.2f} | "
            f"{r.get('bytes_pct_of_fedavg', float('nan')):.1f} | {reach} | {r['factor_norm_max']:.3g} | {cond} |"
        )
    return "\n".join(lines)


def _saved_tables() -> dict[tuple[str, int | None], dict[str, Any]]:
    """The tables of the last write, by (task, rounds): kept for tasks with no runs on disk."""
    path = RESULTS / "fedsrd_stability.json"
    if not path.exists():
        return {}
    return {(t["task"], t["rounds"]): t for t in json.loads(path.read_text())["tables"]}


def write_results(tasks: list[str]) -> None:
    """Rebuild each task's table from its runs on disk; a task with none keeps its saved table.

    Run directories are git-ignored, so a fresh checkout has only the saved tables: running one
    task must not drop the others'.
    """
    saved = _saved_tables()
    built = [task_table(t, TASKS[t]["seeds"], methods_of(t)) for t in TASKS]
    built.append(task_table(LONG["task"], LONG["seeds"], LONG["methods"], LONG["rounds"]))
    tables = []
    for t in built:
        if t["rows"]:
            tables.append(t)
        elif (t["task"], t["rounds"]) in saved:
            tables.append(saved[(t["task"], t["rounds"])])
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "load_average": os.getloadavg(), "written": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fedsrd_stability.json").write_text(json.dumps({"environment": env, "tables": tables}, indent=1) + "\n")
    parts = ["# FedSRD stability\n", "Written by `benchmarks/fedsrd_stability.py` (see its docstring for the grid). "
             "Gaps are the method's final metric minus FedAvg's on the same seed (accuracy points; for "
             "perplexity, FedAvg's minus the method's, relative to FedAvg's, in %), so negative is worse.\n"]  # fmt: skip
    for t in tables:
        title = f"{t['task']}" + (f", {t['rounds']} rounds" if t["rounds"] else "")
        parts.append(f"## {title}\n\n{markdown(t)}\n")
    (RESULTS / "fedsrd_stability.md").write_text("\n".join(parts))
    print("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=[*TASKS, "digits-long"], default=["digits", "news-topics", "lm-tiny"])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: the task's methods")
    ap.add_argument("--seeds", nargs="+", type=int, help="default: the task's seeds")
    ap.add_argument("--tables-only", action="store_true", help="only read finished runs and write the tables")
    args = ap.parse_args(argv)
    if not args.tables_only:
        for task in args.tasks:
            if task == "digits-long":
                for s in args.seeds or LONG["seeds"]:
                    for m in args.methods or LONG["methods"]:
                        run_one(LONG["task"], m, s, LONG["rounds"])
                continue
            for s in args.seeds or TASKS[task]["seeds"]:
                for m in args.methods or methods_of(task):
                    run_one(task, m, s)
    write_results(args.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
