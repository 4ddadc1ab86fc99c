"""The `fedlowrank` command: parses arguments and calls the library, nothing more.

    fedlowrank run [PRESET | CONFIG.toml] [--set key=value ...] [--out DIR] [--runtime sim|flower]
    fedlowrank run --resume DIR
    fedlowrank list
    fedlowrank show NAME
    fedlowrank report DIR [DIR ...] [--out DIR] [--markdown | --json]
    fedlowrank export RUN_DIR --out DIR [--merged] [--round N] [--algorithm NAME]
    fedlowrank generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--round N] [--algorithm NAME]
    fedlowrank demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError
from fedlowrank.errors import CorruptRun, RunBusy, TrainingFailed

__all__ = ["main", "build_parser"]

MB = 1e6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlowrank", description="Communication-efficient federated fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a preset or a config file (default: the default preset)")
    run.add_argument("config", nargs="?", help="preset name (see `fedlowrank list`) or path to a .toml file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set sim.rounds=5 --set algorithm.fedsrd.upload_sparsity=0.9")  # fmt: skip
    run.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<time>)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue a killed run from its last complete round")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--verbose", action="store_true", help="--runtime flower: show Flower's debug log lines")
    run.add_argument("--runtime", choices=("sim", "flower"), default="sim",
                     help="sim: in-process (default); flower: Flower's simulation engine, one SuperNode per client (docs/flower.md)")  # fmt: skip

    sub.add_parser("list", help="list presets, algorithms and tasks")
    show = sub.add_parser("show", help="an algorithm's, a task's or [sim]'s options: types, defaults, meaning")
    show.add_argument("name", help="an algorithm (fedsrd), a task (news-topics) or sim")

    rep = sub.add_parser("report", help="compare finished runs: a table and a plot")
    rep.add_argument("dirs", nargs="+", type=Path, help="run directories (a comparison run counts as its runs)")
    rep.add_argument("--out", type=Path, help="write summary.md, summary.json and curves.png here")
    rep.add_argument("--markdown", action="store_true", help="print the whole table as markdown (every column)")
    rep.add_argument("--json", action="store_true", help="print the runs' summaries as JSON (every field)")

    exp = sub.add_parser("export", help="write a run's PEFT adapter (or the merged model) to a folder")
    exp.add_argument("run", type=Path, help="run directory (finished or not)")
    exp.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    exp.add_argument("--merged", action="store_true", help="write base + adapter merged into one model folder")
    exp.add_argument("--round", type=int, help="an evaluated round (default: the latest complete round)")
    exp.add_argument("--algorithm", help="which algorithm's run, when RUN_DIR compares several")

    gen = sub.add_parser("generate", help="print the fine-tuned model's completion of a prompt")
    gen.add_argument("run", type=Path, help="run directory of a causal-LM task")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--round", type=int, help="an evaluated round (default: the latest complete round)")
    gen.add_argument("--algorithm", help="which algorithm's run, when RUN_DIR compares several")

    sub.add_parser("demo", help="a short walk through the library")
    return p


# --------------------------------------------------------------------------------------------
# progress


class _RichProgress:
    """A progress bar per algorithm with the latest accuracy and megabytes sent."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
        )  # fmt: skip
        self.tasks: dict[str, Any] = {}
        self.last: dict[str, str] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, algorithm: str, rounds: int, done: int) -> None:
        self.tasks[algorithm] = self.progress.add_task(algorithm, total=rounds, completed=done, info="")

    def advance(self, algorithm: str, record: dict[str, Any]) -> None:
        mb = (record["cum_upload_bytes"] + record["cum_download_bytes"]) / MB
        if "eval" in record:
            self.last[algorithm] = f"acc {record['eval']['accuracy']:.3f}"
        info = f"{self.last.get(algorithm, '')}  {mb:.2f} MB"
        if record.get("dropped"):
            info += f"  ({len(record['dropped'])} left out)"
        self.progress.update(self.tasks[algorithm], advance=1, info=info)
        if not record["accepted"]:
            self.progress.console.print(f"[bold yellow]{_no_update(algorithm, record)}[/bold yellow]")

    def finish(self, algorithm: str, summary: dict[str, Any]) -> None:
        if algorithm not in self.tasks:  # finished before a resume: no clock runs for it
            self.tasks[algorithm] = self.progress.add_task(algorithm, total=summary["rounds"], completed=summary["rounds"],
                                                           info="done before the resume", start=False)  # fmt: skip


class _LineProgress:
    """One line per evaluated round, for logs (no terminal)."""

    def __init__(self, console) -> None:
        self.console = console

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start(self, algorithm: str, rounds: int, done: int) -> None:
        self.console.print(f"{algorithm}: rounds {done + 1}..{rounds}")

    def advance(self, algorithm: str, record: dict[str, Any]) -> None:
        if "eval" in record or record.get("dropped"):
            mb = (record["cum_upload_bytes"] + record["cum_download_bytes"]) / MB
            acc = f"accuracy {record['eval']['accuracy']:.4f}  " if "eval" in record else ""
            left = f"  {len(record['dropped'])} client(s) left out" if record.get("dropped") else ""
            self.console.print(f"  {algorithm} round {record['round']}: {acc}{mb:.3f} MB sent{left}")
        if not record["accepted"]:
            self.console.print(_no_update(algorithm, record))

    def finish(self, algorithm: str, summary: dict[str, Any]) -> None:
        pass


def _no_update(algorithm: str, record: dict[str, Any]) -> str:
    reasons = sorted({d["reason"] for d in record.get("dropped", [])})
    why = f": {reasons[0][:120]}" + (f" (and {len(reasons) - 1} more reasons)" if len(reasons) > 1 else "") if reasons else ""
    return f"warning: {algorithm} round {record['round']}: no upload accepted, the global state is unchanged{why}"


# columns of the summary table, most important first: narrow terminals drop from the end
# (`report --markdown` and `--json` always carry every column)
_COLUMNS = ("algorithm", "accuracy", "MB total", "wall s", "MB up", "MB down", "up bound MB")


def _summary_rows(summaries: list[dict[str, Any]], labels: list[str]) -> list[dict[str, str]]:
    rows = []
    for s, label in zip(summaries, labels, strict=True):
        rows.append({
            "algorithm": label + (f" (seed {s['seed']})" if labels.count(label) > 1 else ""),
            "accuracy": "-" if s.get("accuracy") is None else f"{100 * s['accuracy']:.2f} %",
            "MB total": f"{s['total_mb']:.3f}", "wall s": f"{s['wall_seconds']:.1f}",
            "MB up": f"{s['upload_mb']:.3f}", "MB down": f"{s['download_mb']:.3f}",
            "up bound MB": f"{s['upload_bound_bytes'] / MB:.3f}",
        })  # fmt: skip
    return rows


def _summary_table(summaries: list[dict[str, Any]], labels: list[str], title: str, width: int = 200):
    """The summary as a rich table no wider than `width`: numbers are never cut; columns are
    dropped from the least important, and the algorithm names wrap."""
    from rich.table import Table

    rows = _summary_rows(summaries, labels)
    cols = list(_COLUMNS)

    def need(cs):  # rich's box: a border and one space each side of every cell
        numbers = sum(max([len(c)] + [len(r[c]) for r in rows]) + 3 for c in cs if c != "algorithm")
        return numbers + 4 + 1

    while len(cols) > 2 and need(cols) + 12 > width:
        cols.pop()
    dropped = [c for c in _COLUMNS if c not in cols]
    caption = f"(narrow terminal: {', '.join(dropped)} left out; `fedlowrank report --markdown` has them)" if dropped else None
    table = Table(title=title, caption=caption)
    for col in cols:
        if col == "algorithm":
            table.add_column(col, justify="left", overflow="fold", min_width=8)
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(*(r[c] for c in cols))
    return table


# --------------------------------------------------------------------------------------------
# commands


def _cmd_run(args, console) -> int:
    from fedlowrank.runconfig import load_run_config
    from fedlowrank.runs.experiment import default_out_dir, load_saved_config, run_experiment

    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume DIR takes the config saved in DIR; drop the preset, --set and --out")
        cfg, out, resume = load_saved_config(args.resume), args.resume, True
    else:
        cfg, path = load_run_config(args.config, args.overrides)
        out, resume = args.out or default_out_dir(cfg), False
        if not args.quiet:
            console.print(f"[bold]{cfg.name}[/bold] ({path}): {', '.join(cfg.algorithms)} on {cfg.task_name}, "
                          f"{cfg.sim.rounds} rounds, seed {cfg.seed}")  # fmt: skip
    t0 = time.perf_counter()
    try:
        if args.runtime == "flower":
            from fedlowrank.flower.simulate import simulate

            if resume:
                summaries = simulate(None, [], out, verbose=args.verbose, quiet=args.quiet, resume=True)
            else:
                summaries = simulate(args.config, args.overrides, out, verbose=args.verbose, quiet=args.quiet)
        elif args.quiet:
            summaries = run_experiment(cfg, out, resume=resume)
        else:
            progress_cls = _RichProgress if console.is_terminal else _LineProgress

            def built(seconds: float) -> None:
                console.print(f"task {cfg.task_name} ready in {seconds:.1f} s")

            with progress_cls(console) as progress:
                summaries = run_experiment(cfg, out, resume=resume, progress=progress, on_task_built=built)
    except KeyboardInterrupt:
        flag = " --runtime flower" if args.runtime == "flower" else ""
        print(f"fedlowrank: interrupted; continue with: fedlowrank run --resume {out}{flag}", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    if not args.quiet:
        console.print(_summary_table(summaries, [s["algorithm"] for s in summaries], f"{cfg.name} on {cfg.task_name}",
                                     console.width))  # fmt: skip
    console.print(f"run directory: {out}   (wall {wall:.1f} s)", soft_wrap=True, markup=False)
    return 0


def _cmd_list(console) -> int:
    from rich.table import Table

    from fedlowrank.algorithms import ALGORITHMS, algorithm_description
    from fedlowrank.runconfig import DEFAULT_PRESET, list_presets
    from fedlowrank.tasks import TASKS

    presets = Table(title="presets (fedlowrank run NAME)")
    presets.add_column("name")
    presets.add_column("description")
    for name, path in list_presets().items():
        try:
            desc = tomllib.loads(path.read_text()).get("description", "")
        except tomllib.TOMLDecodeError as e:
            desc = f"(invalid TOML: {e})"
        presets.add_row(name + (" (default)" if name == DEFAULT_PRESET else ""), desc)
    algs = Table(title="algorithms (options: \\[algorithm.NAME] table)")
    algs.add_column("name")
    algs.add_column("description")
    for name, cls in ALGORITHMS.items():
        algs.add_row(name, algorithm_description(cls))
    tasks = Table(title="tasks (\\[task] name = ...)")
    tasks.add_column("name")
    tasks.add_column("description")
    for name, (_, desc) in TASKS.items():
        tasks.add_row(name, desc)
    for t in (presets, algs, tasks):
        console.print(t)
    return 0


def _cmd_show(args, console) -> int:
    from rich.markup import escape
    from rich.table import Table

    from fedlowrank.options import describe

    d = describe(args.name)
    table = Table(title=escape(f"{d.kind} {d.name}: options ({d.table} in a run config, or --set)"), title_justify="left")
    table.add_column("option", no_wrap=True)
    table.add_column("type", overflow="fold")
    table.add_column("default", overflow="fold")
    table.add_column("meaning", overflow="fold", ratio=1)
    for o in d.options:
        table.add_row(o.name, escape(o.type), escape(o.default), escape(o.doc))
    console.print(escape(d.description))
    console.print(table)
    return 0


def _cmd_report(args, console) -> int:
    from fedlowrank.runs.report import curves_title, label_runs, markdown_table, plot_curves, summarize
    from fedlowrank.runs.rundir import RunDir, atomic_write, find_runs

    runs = find_runs(args.dirs)
    summaries, records = [], []
    for rd in runs:
        recs = rd.read_metrics()
        if rd.summary_json.exists():
            s = json.loads(rd.summary_json.read_text())
        else:  # unfinished: summarise what is there
            s = summarize(recs, f"{rd.path.name} (unfinished)", "?", -1, str(rd.path))
        summaries.append(s)
        records.append(recs)
    labels = label_runs(summaries)
    if args.json:
        print(json.dumps({"runs": summaries, "dirs": [str(r.path) for r in runs]}, indent=1))
    elif args.markdown:
        print(markdown_table(summaries), end="")
    else:
        console.print(_summary_table(summaries, labels, f"{len(runs)} run(s)", console.width))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        top = RunDir(args.out)
        top.write_json(top.summary_json, {"runs": summaries, "dirs": [str(r.path) for r in runs]})
        atomic_write(top.summary_md, markdown_table(summaries))
        tasks = sorted({str(s.get("task", "?")) for s in summaries})
        rounds = max((int(s.get("rounds", 0) or 0) for s in summaries), default=0)
        seeds = [int(s["seed"]) for s in summaries if isinstance(s.get("seed"), int) and s["seed"] >= 0]
        plot_curves(list(zip(labels, records, strict=True)), top.curves,
                    title=curves_title(" / ".join(tasks), seeds or [0], rounds, f"{len(runs)} run(s)"))  # fmt: skip
        console.print(f"wrote {top.summary_md}, {top.summary_json}, {top.curves}")
    return 0


def _cmd_export(args, console) -> int:
    from fedlowrank.runs.export import export_run

    got = export_run(args.run, args.out, merged=args.merged, round=args.round, algorithm=args.algorithm)
    what = "merged model" if got["merged"] else "adapter"
    clients = f" (and {got['clients']} clients' own under clients/)" if got["clients"] else ""
    console.print(f"wrote the {what} of {got['algorithm']} at round {got['round']} to {got['out']}{clients}")
    return 0


def _cmd_generate(args) -> int:
    from fedlowrank.runs.export import load_run_state

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    rs = load_run_state(args.run, args.round, args.algorithm)
    task = rs.build_task()
    if not callable(getattr(task, "generate", None)):
        raise ConfigError(f"{rs.rd.path}: task {rs.cfg.task_name!r} does not generate text (not a causal LM)")
    print(task.generate(rs.global_state, args.prompt, args.max_new_tokens))
    return 0


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(stderr=False, highlight=False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _cmd_run(args, console)
        if args.command == "list":
            return _cmd_list(console)
        if args.command == "show":
            return _cmd_show(args, console)
        if args.command == "report":
            return _cmd_report(args, console)
        if args.command == "export":
            return _cmd_export(args, console)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "demo":
            from fedlowrank.demo import main as demo_main

            return int(demo_main() or 0)
    except ConfigError as e:
        print(f"fedlowrank: config error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError) as e:
        print(f"fedlowrank: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"fedlowrank: run failed: {e}", file=sys.stderr)
        return 1
    except (CorruptRun, RunBusy) as e:
        print(f"fedlowrank: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
