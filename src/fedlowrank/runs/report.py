"""Summaries of finished runs: summary.json, a markdown table and curves.png.

Megabytes are 10^6 bytes, counted from the encoded payloads (`len(bytes)`), uploads and
downloads apart. "bound" is the information bound of the same payloads (k value bits plus
log2 C(n, k) position bits per tensor), the least any position encoding could send.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["summarize", "markdown_table", "plot_curves", "group_rows", "label_runs", "MB"]

MB = 1e6


def summarize(records: Sequence[dict[str, Any]], algorithm: str, task: str, seed: int, name: str) -> dict[str, Any]:
    """summary.json of one run from its metrics records (`name`: the run config's name)."""
    evals = [(r["round"], r["eval"]) for r in records if "eval" in r]
    final = evals[-1][1] if evals else {}
    up = sum(r["upload_bytes"] for r in records)
    down = sum(r["download_bytes"] for r in records)
    return {
        "name": name,
        "algorithm": algorithm,
        "task": task,
        "seed": seed,
        "rounds": records[-1]["round"] if records else 0,
        "final_round": evals[-1][0] if evals else None,
        "final": final,
        "accuracy": final.get("accuracy"),
        "best_accuracy": max((e.get("accuracy", float("nan")) for _, e in evals), default=None),
        "upload_bytes": up,
        "download_bytes": down,
        "upload_bound_bytes": sum(r["upload_bound_bytes"] for r in records),
        "download_bound_bytes": sum(r["download_bound_bytes"] for r in records),
        "upload_mb": up / MB,
        "download_mb": down / MB,
        "total_mb": (up + down) / MB,
        "dropped": sum(len(r.get("dropped", [])) for r in records),
        "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in records),
        "train_seconds": sum(r.get("train_seconds", 0.0) for r in records),
        "server_seconds": sum(r.get("server_seconds", 0.0) for r in records),
    }


def _fmt(values: list[float], digits: int) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def label_runs(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """A row label per run: the algorithm, prefixed by the config name when several configs are
    shown. Runs that share a label (the same config and algorithm, other seeds) are pooled."""
    names = {s.get("name", "") for s in summaries}
    return [s["algorithm"] if len(names) == 1 else f"{s.get('name', '?')} / {s['algorithm']}" for s in summaries]


def group_rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label (runs of the same algorithm over seeds are pooled: mean ± sd)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s, label in zip(summaries, label_runs(summaries), strict=True):
        groups.setdefault(label, []).append(s)
    rows = []
    for label, runs in groups.items():
        rows.append(
            {
                "label": label,
                "runs": len(runs),
                "seeds": sorted({r["seed"] for r in runs}),
                "rounds": sorted({r["rounds"] for r in runs}),
                "accuracy": [100 * r["accuracy"] if r["accuracy"] is not None else None for r in runs],
                "upload_mb": [r["upload_mb"] for r in runs],
                "download_mb": [r["download_mb"] for r in runs],
                "total_mb": [r["total_mb"] for r in runs],
                "upload_bound_mb": [r["upload_bound_bytes"] / MB for r in runs],
                "wall_seconds": [r["wall_seconds"] for r in runs],
            }
        )
    return rows


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    rows = group_rows(summaries)
    multi = any(r["runs"] > 1 for r in rows)
    head = ["algorithm"] + (["runs"] if multi else []) + [
        "accuracy %", "MB up", "MB down", "MB total", "up bound MB", "up / bound", "wall s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        ratio = [u / b for u, b in zip(r["upload_mb"], r["upload_bound_mb"], strict=True) if b > 0]
        cells = [r["label"]] + ([str(r["runs"])] if multi else []) + [
            _fmt(r["accuracy"], 2),
            _fmt(r["upload_mb"], 3),
            _fmt(r["download_mb"], 3),
            _fmt(r["total_mb"], 3),
            _fmt(r["upload_bound_mb"], 3),
            _fmt(ratio, 3),
            _fmt(r["wall_seconds"], 1),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curve(records: Sequence[dict[str, Any]], metric: str) -> tuple[list[int], list[float], list[float]]:
    """(eval rounds, cumulative MB sent by then, metric) of one run."""
    cum, rounds, mbs, ys = 0.0, [], [], []
    for r in records:
        cum += (r["upload_bytes"] + r["download_bytes"]) / MB
        if "eval" in r and metric in r["eval"]:
            rounds.append(r["round"])
            mbs.append(cum)
            ys.append(r["eval"][metric])
    return rounds, mbs, ys


def plot_curves(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: Path, metric: str = "accuracy") -> None:
    """`metric` against cumulative megabytes sent (up + down, log scale) and against rounds.

    One colour per label; runs sharing a label (seeds) are drawn thin, their mean bold.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[list[int], list[float], list[float]]]] = {}
    for label, records in series:
        groups.setdefault(label, []).append(_curve(records, metric))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    fig, (ax_mb, ax_round) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, runs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        many = len(runs) > 1
        for rounds, mbs, ys in runs:
            kw = {"color": color, "alpha": 0.3, "linewidth": 0.8} if many else {"color": color, "marker": "o", "markersize": 3}
            ax_mb.plot(mbs, ys, label=None if many else label, **kw)
            ax_round.plot(rounds, ys, **kw)
        if many:  # the mean over runs at the eval rounds they share
            common = sorted(set.intersection(*(set(r) for r, _, _ in runs)))
            mean = [
                [statistics.mean(run[k][run[0].index(t)] for run in runs) for t in common] for k in (1, 2)
            ]  # fmt: skip
            ax_mb.plot(mean[0], mean[1], color=color, marker="o", markersize=3, linewidth=2, label=f"{label} (mean of {len(runs)})")
            ax_round.plot(common, mean[1], color=color, marker="o", markersize=3, linewidth=2)
    ax_mb.set_xscale("log")
    ax_mb.set_xlabel("cumulative MB sent (upload + download), log scale")
    ax_round.set_xlabel("round")
    for ax in (ax_mb, ax_round):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both")
    ax_mb.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
