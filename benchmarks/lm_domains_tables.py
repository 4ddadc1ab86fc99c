"""The FedSRD paper's Tables 3, 4 and 7 and a byte-budget table, at our scale, on `lm-domains`.

Runs (or resumes, skipping what has finished) the preset `lm-domains-fedsrd-tables` (16 methods
and ablation variants, same seed, data, initial adapter and local steps) and three more FedSRD
runs that change only the wire format (fp32 + bitmap positions, bf16 and fp16 values with golomb
positions), then writes the tables from the run directories' ledgers:

* Table 3: per-domain, in-domain and out-of-domain perplexity; MB up and down per client per
  round (mean over every client upload / download in the ledger); bytes as % of FedAvg's.
* Table 4: FedSRD with its components removed one after another (the paper's cumulative
  ablation): fixed ratio, then random (DARE) uploads, then FlexLoRA's dense SVD download, then
  plain averaging.
* Table 7: FedAvg with random, magnitude and importance top-k uploads.
* L1 rescaling of top-k uploads (the published code's, not in the paper), FedSRD and FedAvg.
* Byte budget: FedSRD's wire formats side by side.
* Longer horizon: FedAvg and FedSRD for 16 rounds (in-domain / OOD perplexity every 4 rounds
  against cumulative MB), since the paper runs 50-100 rounds and the preset only 6.

A "no fine-tuning" row scores the base model (LoRA B = 0, so the adapter is the identity).

Writes benchmarks/results/lm_domains_tables.{json,md} and lm_domains_curves.png (in-domain
perplexity against cumulative MB sent and against rounds, Table 3's methods).

    .venv/bin/python benchmarks/lm_domains_tables.py                 # ~2 h on 2 cores, 21 runs
    .venv/bin/python benchmarks/lm_domains_tables.py --tables-only   # from existing runs
    .venv/bin/python benchmarks/lm_domains_tables.py --replot        # redraw the plot from the JSON
    .venv/bin/python benchmarks/lm_domains_tables.py --table3-curves # rerun Table 3's 8 methods only (~40 min)

`--table3-curves` reruns only Table 3's methods (same preset, seed and settings) into their own run
directory, checks each run's best in-domain perplexity and MB up against the saved tables, and
stores their per-round curves in the JSON (the tables themselves are left as they are).

The JSON keeps each Table 3 run's per-round bytes and in-domain perplexity (`curves`), so the
plot can be redrawn without the run directories.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedlowrank.runconfig import load_run_config
from fedlowrank.runs.experiment import run_experiment
from fedlowrank.runs.report import curves_title, plot_curves
from fedlowrank.runs.rundir import RunDir
from fedlowrank.tasks import make_task

PRESET = "lm-domains-fedsrd-tables"
WIRE = {  # run name suffix: --set overrides (the main run's fedsrd is fp32 + auto/golomb)
    "fp32-bitmap": ["sim.upload_positions=bitmap"],
    "bf16-golomb": ["sim.upload_dtype=bf16", "sim.download_dtype=bf16", "sim.upload_positions=golomb"],
    "fp16-golomb": ["sim.upload_dtype=fp16", "sim.download_dtype=fp16", "sim.upload_positions=golomb"],
}
LONG = ['algorithms=["fedavg","fedsrd"]', "name=lm-domains-long", "sim.rounds=16", "sim.eval_every=4"]
TABLE3 = ["fedavg", "fedprox", "ffa-lora", "flexlora", "fed-dare", "fedsrd-e", "fedsrd", "fedsrd-rebalance"]
TABLE4 = [
    ("FedSRD", "fedsrd"),
    ("- adaptive ratio (fixed 85% drop)", "fedsrd-fixed-ratio"),
    ("- importance-aware sparsification (DARE upload)", "fedsrd-random-upload"),
    ("- alternating decomposition (dense SVD download)", "flexlora-random-upload"),
    ("- reconstruction (plain factor averaging)", "fedavg-random-upload"),
]
TABLE7 = [
    ("FedAvg", "fedavg"),
    ("+ random sparsification (Fed-DARE, 90% drop)", "fed-dare"),
    ("+ magnitude top-k", "fedavg-magnitude"),
    ("+ importance-aware top-k (FedSRD Eq. 6)", "fedavg-importance"),
]
RESCALE = [
    ("FedSRD (paper: no rescale)", "fedsrd"),
    ("FedSRD, L1 rescale (published code)", "fedsrd-l1-rescale"),
    ("FedAvg + importance top-k", "fedavg-importance"),
    ("FedAvg + importance top-k, L1 rescale", "fedavg-importance-l1-rescale"),
]
MB = 1e6


def run_all(root: Path) -> None:
    main_cfg, _ = load_run_config(PRESET)
    out = root / "lm-domains-tables"
    run_experiment(main_cfg, out, resume=(out / "config.toml").exists())
    for variant, sets in WIRE.items():
        cfg, _ = load_run_config(PRESET, ['algorithms=["fedsrd"]', f"name=lm-domains-{variant}", *sets])
        d = root / f"lm-domains-{variant}"
        run_experiment(cfg, d, resume=(d / "config.toml").exists())
    cfg, _ = load_run_config(PRESET, LONG)
    d = root / "lm-domains-long"
    run_experiment(cfg, d, resume=(d / "config.toml").exists())


def finished_metrics(rd: RunDir) -> list[dict[str, Any]]:
    """The metrics records of a finished run; exits with a clear message otherwise."""
    if not rd.is_complete():
        raise SystemExit(f"{rd.path}: run not finished; run without --tables-only to finish it")
    return rd.read_metrics()


def ledger_row(rd: RunDir) -> dict[str, Any]:
    """Final evaluation and mean bytes per client upload / download of one finished run."""
    records = finished_metrics(rd)
    evals = [(r["round"], r["eval"]) for r in records if "eval" in r]
    final = evals[-1][1]
    best_round, best = min(evals, key=lambda e: e[1]["in_domain_ppl"])
    ups = [c["upload_bytes"] for r in records for c in r["per_client"] if c.get("status") == "ok"]
    downs = [c["download_bytes"] for r in records for c in r["per_client"]]
    up_bound = [c["upload_bound_bytes"] for r in records for c in r["per_client"] if c.get("status") == "ok"]
    return {
        "eval": final,
        "best_in_domain_ppl": best["in_domain_ppl"],
        "best_round": best_round,
        "rounds": records[-1]["round"],
        "mb_up": sum(ups) / len(ups) / MB,
        "mb_down": sum(downs) / len(downs) / MB,
        "mb_up_bound": sum(up_bound) / len(up_bound) / MB,
        "wall_s": sum(r.get("wall_seconds", 0.0) for r in records),
    }


def base_model_eval() -> dict[str, float]:
    cfg, _ = load_run_config(PRESET)
    task = make_task(cfg.task_name, cfg.task, cfg.seed).build()
    return task.evaluate()


def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def tables(root: Path, base: dict[str, float] | None) -> tuple[dict[str, Any], str]:
    cfg, _ = load_run_config(PRESET)
    domains, ood = list(cfg.task.domains), list(cfg.task.ood_domains)
    rows = {a: ledger_row(RunDir(root / "lm-domains-tables" / a)) for a in cfg.algorithms}
    wire = {"fp32-golomb": rows["fedsrd"]}
    wire.update({v: ledger_row(RunDir(root / f"lm-domains-{v}")) for v in WIRE})
    ref = rows["fedavg"]
    ref_mb = ref["mb_up"] + ref["mb_down"]

    def pct(r):
        return 100 * (r["mb_up"] + r["mb_down"]) / ref_mb

    t = cfg.task
    lines = [
        "# lm-domains: the FedSRD paper's Tables 3, 4 and 7 at our scale",
        "",
        f"SmolLM2-135M-Instruct, LoRA r {t.lora_rank} (alpha {t.lora_alpha or 2 * t.lora_rank:g}) on every linear layer, "
        f"{len(domains)} clients (one per domain: {', '.join(domains)}), {t.train_examples} training and "
        f"{t.eval_examples} held-out examples per domain, {t.seq_len}-token sequences, {cfg.sim.rounds} rounds of "
        f"{t.local_steps} local AdamW steps (batch {t.batch_size}, lr {t.lr:g}), seed {cfg.seed}. Perplexity is "
        "exp(mean completion loss) per domain; in-domain and OOD are the means over domains "
        f"(OOD: {', '.join(ood)}, which no client trains on). MB per client per round: the mean encoded "
        "upload / download (10^6 bytes) in the ledger.",
        "",
        "Command: `.venv/bin/python benchmarks/lm_domains_tables.py`",
        "",
        "![in-domain perplexity against MB sent and rounds](lm_domains_curves.png)",
        "",
        "## Table 3: methods",
        "",
        "| method | " + " | ".join(f"{d} ppl" for d in domains) + " | in-domain ppl | OOD ppl | best in-domain ppl (round) | MB up | MB down | bytes % of FedAvg |",
        "|---|" + "---:|" * (len(domains) + 6),
    ]

    def t3(label, e, r=None):
        cells = [_f(e[f"{d}_ppl"]) for d in domains] + [_f(e["in_domain_ppl"]), _f(e["ood_ppl"])]
        cells += [f"{_f(r['best_in_domain_ppl'])} ({r['best_round']})"] if r else ["-"]
        cells += [_f(r["mb_up"], 3), _f(r["mb_down"], 3), _f(pct(r), 1)] if r else ["0", "0", "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if base is not None:
        t3("no fine-tuning (base model)", base)
    for a in TABLE3:
        t3(a, rows[a]["eval"], rows[a])
    goal = []
    for a in ("fedsrd", "fedsrd-e", "fedsrd-rebalance"):
        r = rows[a]
        ok = pct(r) <= 10.0 and r["eval"]["in_domain_ppl"] <= ref["eval"]["in_domain_ppl"]
        goal.append(
            f"- {a}: {pct(r):.1f}% of FedAvg's bytes, final in-domain ppl {r['eval']['in_domain_ppl']:.3f} vs "
            f"FedAvg {ref['eval']['in_domain_ppl']:.3f} (best {r['best_in_domain_ppl']:.3f} vs "
            f"{ref['best_in_domain_ppl']:.3f}): goal (<= 10% of the bytes, final ppl no worse) "
            f"{'met' if ok else 'NOT met'}"
        )
    lines += ["", *goal]
    for title, first, spec in (
        ("Table 4: ablation (components removed one after another)", "row", TABLE4),
        ("Table 7: upload sparsification as a FedAvg plug-in", "method", TABLE7),
        ("Rescaling the kept upload entries to the dense delta's L1 mass", "method", RESCALE),
    ):
        lines += ["", f"## {title}", "", f"| {first} | run | in-domain ppl | OOD ppl | MB up | MB down |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for label, a in spec:
            r = rows[a]
            lines.append(f"| {label} | {a} | {_f(r['eval']['in_domain_ppl'])} | {_f(r['eval']['ood_ppl'])} | "
                         f"{_f(r['mb_up'], 3)} | {_f(r['mb_down'], 3)} |")  # fmt: skip
    lines += ["", "## Byte budget: FedSRD's wire format", "",
              "| values + upload positions | MB up | up / bound | MB down | bytes % of FedAvg | in-domain ppl | OOD ppl |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for v, r in wire.items():
        lines.append(f"| {v} | {_f(r['mb_up'], 3)} | {_f(r['mb_up'] / r['mb_up_bound'], 3)} | {_f(r['mb_down'], 3)} | "
                     f"{_f(pct(r), 1)} | {_f(r['eval']['in_domain_ppl'], 3)} | {_f(r['eval']['ood_ppl'], 3)} |")  # fmt: skip
    lines += ["", "(FedSRD's downloads are DARE-masked with a seeded mask: no position bytes in any format. "
              "fp32-golomb is the main run's FedSRD: `upload_positions = \"auto\"` picks golomb for sparse tensors.)",
              ""]  # fmt: skip
    long_cfg, _ = load_run_config(PRESET, LONG)
    lines += [f"## Longer horizon: {long_cfg.sim.rounds} rounds", "",
              "`fedlowrank run lm-domains-fedsrd-tables --set '" + "' --set '".join(LONG) + "'`", "",
              "| method | round | in-domain ppl | OOD ppl | cumulative MB (up + down, all clients) |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    long_runs = {}
    for a in long_cfg.algorithms:
        pts = [
            {"round": r["round"], "in_domain_ppl": r["eval"]["in_domain_ppl"], "ood_ppl": r["eval"]["ood_ppl"],
             "cum_mb": (r["cum_upload_bytes"] + r["cum_download_bytes"]) / MB}
            for r in finished_metrics(RunDir(root / "lm-domains-long" / a)) if "eval" in r
        ]  # fmt: skip
        long_runs[a] = pts
        for p in pts:
            lines.append(f"| {a} | {p['round']} | {_f(p['in_domain_ppl'])} | {_f(p['ood_ppl'])} | {_f(p['cum_mb'], 1)} |")
    lines.append("")
    data = {
        "long_horizon": long_runs,
        "config": cfg.to_mapping(),
        "base_model": base,
        "runs": rows,
        "wire": wire,
        "bytes_percent_of_fedavg": {a: pct(r) for a, r in rows.items()},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
    }
    return data, "\n".join(lines)


def curves_of(run: Path) -> dict[str, list[dict[str, Any]]]:
    """Per-round bytes and in-domain perplexity of Table 3's methods in one finished run directory."""
    return {a: [{"round": r["round"], "upload_bytes": r["upload_bytes"], "download_bytes": r["download_bytes"],
                 **({"eval": {"in_domain_ppl": r["eval"]["in_domain_ppl"]}} if "in_domain_ppl" in r.get("eval", {}) else {})}
                for r in finished_metrics(RunDir(run / a))] for a in TABLE3}  # fmt: skip


def table3_curves(root: Path, out: Path) -> None:
    """Rerun Table 3's methods only; check them against the saved tables; save their curves and replot."""
    path = out / "lm_domains_tables.json"
    saved = json.loads(path.read_text())
    cfg, _ = load_run_config(PRESET, [f"algorithms={json.dumps(TABLE3)}", "name=lm-domains-table3"])
    d = root / "lm-domains-table3"
    run_experiment(cfg, d, resume=(d / "config.toml").exists())
    print(f"{'method':<18} {'best ppl (tables)':>18} {'best ppl (rerun)':>17} {'MB up (tables)':>15} {'MB up (rerun)':>14}")
    checks = {}
    for a in TABLE3:
        new, old = ledger_row(RunDir(d / a)), saved["runs"][a]
        checks[a] = {"best_in_domain_ppl": new["best_in_domain_ppl"], "mb_up": new["mb_up"],
                     "tables_best_in_domain_ppl": old["best_in_domain_ppl"], "tables_mb_up": old["mb_up"]}  # fmt: skip
        print(f"{a:<18} {old['best_in_domain_ppl']:>18.3f} {new['best_in_domain_ppl']:>17.3f} "
              f"{old['mb_up']:>15.3f} {new['mb_up']:>14.3f}")  # fmt: skip
    saved["curves"] = curves_of(d)
    saved["curves_source"] = {"run": "--table3-curves", "check_against_tables": checks}
    path.write_text(json.dumps(saved, indent=2, default=str) + "\n")
    plot_curves(list(saved["curves"].items()), out / "lm_domains_curves.png", metric="in_domain_ppl", title=_title())
    print(f"wrote {path} and {out / 'lm_domains_curves.png'}")


def _title() -> str:
    cfg, _ = load_run_config(PRESET)
    return curves_title(cfg.task_name, [cfg.seed], cfg.sim.rounds, "Table 3 methods")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="runs/results", help="where the run directories go")
    ap.add_argument("--tables-only", action="store_true", help="do not run; tabulate finished runs")
    ap.add_argument("--no-base", action="store_true", help="skip the base-model evaluation row")
    ap.add_argument("--results", default="benchmarks/results", help="where the JSON and markdown go")
    ap.add_argument("--replot", action="store_true", help="only redraw lm_domains_curves.png from the saved JSON")
    ap.add_argument("--table3-curves", action="store_true",
                    help="rerun only Table 3's methods, check them against the saved tables, save their curves")  # fmt: skip
    args = ap.parse_args()
    root = Path(args.root)
    out = Path(args.results)
    if args.replot:
        saved = json.loads((out / "lm_domains_tables.json").read_text())
        if "curves" not in saved:
            raise SystemExit(f"{out / 'lm_domains_tables.json'} has no per-round curves (written before they were "
                             "saved): rerun with --tables-only from the run directories, or run the benchmark")  # fmt: skip
        plot_curves(list(saved["curves"].items()), out / "lm_domains_curves.png", metric="in_domain_ppl",
                    title=_title())  # fmt: skip
        print(f"wrote {out / 'lm_domains_curves.png'}")
        return
    if args.table3_curves:
        table3_curves(root, out)
        return
    t0 = time.perf_counter()
    if not args.tables_only:
        run_all(root)
    base = None if args.no_base else base_model_eval()
    data, md = tables(root, base)
    curves = curves_of(root / "lm-domains-tables")
    data["curves"] = curves
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_domains_tables.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / "lm_domains_tables.md").write_text(md)
    plot_curves(list(curves.items()), out / "lm_domains_curves.png", metric="in_domain_ppl", title=_title())
    print(md)
    print(f"wrote {out / 'lm_domains_tables.md'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
