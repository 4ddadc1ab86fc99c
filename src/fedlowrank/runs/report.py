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


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def algorithm_style(label: str) -> dict[str, Any]:
    """One colour, line style and marker per algorithm, the same in every plot: registered
    algorithms by their place in the registry (solid lines first), other labels (variants) by a
    hash of the name (dashed or dotted, so they never look like a registered one)."""
    import zlib

    import matplotlib

    from fedlowrank.algorithms import ALGORITHMS

    colors = matplotlib.colormaps["tab10"].colors
    names = list(ALGORITHMS)
    if label in names:
        i = names.index(label)
        return {"color": colors[i % 10], "linestyle": _LINESTYLES[(i // 10) % 4], "marker": _MARKERS[i % len(_MARKERS)]}
    h = zlib.crc32(label.encode())
    return {"color": colors[h % 10], "linestyle": _LINESTYLES[1 + (h // 10) % 3], "marker": _MARKERS[(h // 30) % len(_MARKERS)]}


def plot_curves(
    series: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: Path, metric: str = "accuracy", title: str | None = None
) -> None:
    """`metric` against cumulative megabytes sent (up + down, log scale) and against rounds.

    One style per algorithm (`algorithm_style`, the same in every plot); runs sharing a label
    (seeds) are drawn thin, their mean bold. The legend sits below the axes, so it never covers
    a curve; `title` (task, seed, rounds) heads the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    groups: dict[str, list[tuple[list[int], list[float], list[float]]]] = {}
    for label, records in series:
        groups.setdefault(label, []).append(_curve(records, metric))
    fig, (ax_mb, ax_round) = plt.subplots(1, 2, figsize=(11, 4.6))
    handles = []
    for label, runs in groups.items():
        style = algorithm_style(label.split(" (")[0])
        many = len(runs) > 1
        for rounds, mbs, ys in runs:
            kw = dict(style, alpha=0.3, linewidth=0.8, marker=None) if many else dict(style, markersize=3.5, linewidth=1.4)
            line, = ax_mb.plot(mbs, ys, **kw)
            ax_round.plot(rounds, ys, **kw)
            if not many:
                line.set_label(label)
                handles.append(line)
        if many:  # the mean over runs at the eval rounds they share
            common = sorted(set.intersection(*(set(r) for r, _, _ in runs)))
            mean = [
                [statistics.mean(run[k][run[0].index(t)] for run in runs) for t in common] for k in (1, 2)
            ]  # fmt: skip
            line, = ax_mb.plot(mean[0], mean[1], **dict(style, markersize=3.5, linewidth=2.2), label=f"{label} (mean of {len(runs)})")
            ax_round.plot(common, mean[1], **dict(style, markersize=3.5, linewidth=2.2))
            handles.append(line)
    ax_mb.set_xscale("log")
    ax_mb.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    ax_mb.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax_mb.xaxis.set_minor_formatter(NullFormatter())  # minor ticks unlabelled: no overlapping labels
    ax_mb.set_xlabel("cumulative MB sent (upload + download), log scale")
    ax_round.set_xlabel("round")
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_mb.set_title(f"{metric} against bytes", fontsize=10)
    ax_round.set_title(f"{metric} against rounds", fontsize=10)
    for ax in (ax_mb, ax_round):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title, fontsize=11)
    ncol = min(len(handles), 4) or 1
    rows = (len(handles) + ncol - 1) // ncol
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * rows, 1, 0.95 if title else 1))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def curves_title(task: str, seeds: Sequence[int], rounds: int, name: str = "") -> str:
    """"NAME: TASK, seed S, N rounds" (seeds listed when several)."""
    s = sorted(set(seeds))
    seed = f"seed {s[0]}" if len(s) == 1 else f"seeds {', '.join(map(str, s))}"
    return f"{name + ': ' if name else ''}{task}, {seed}, {rounds} rounds"
