"""Deal the rows of local data files to federated clients, each with a training and an
evaluation split (the `causal-lm` and `text-classification` tasks).

How rows become clients (`partition`; "auto" picks the first that applies):

* `column`: rows with the same value in `client_column` form one client (a natural split, as
  the FedSRD paper's one-domain-per-client setup); clients in sorted order of the value.
* `files`: `data` lists one file per client; the client is named by the file's stem.
* `iid`, `dirichlet`, `shards`, `size-skewed`: `num_clients` clients from Flower Datasets'
  partitioners (`flwr-datasets`): IID (the rows are shuffled first with the run's seed: Flower's
  IID partitioner cuts a local table in order), Dirichlet(`alpha`) over `partition_column`,
  pathological shards (`shards_per_client` values of `partition_column` per client) and
  exponentially skewed sizes.

Evaluation: with `eval_data` (files like `data`: the same client column, or one file per
client), each client is scored on its own rows there; with a partitioner, `eval_data` is one
global test set and clients have no split of their own. Without `eval_data`, every client holds
out `eval_fraction` of its rows (at least one), and the global test set is their union.

Every failure is a `DataError` naming what is wrong before any training: more clients than
rows, a client left with no training or no evaluation rows, eval files that do not match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedlowrank.seeds import derive_seed
from fedlowrank.config import choice, require
from fedlowrank.data.tables import DataError, load_table, require_columns

__all__ = ["ClientDataConfig", "ClientRows", "Federation", "federate", "PARTITIONS"]

PARTITIONS = ("auto", "column", "files", "iid", "dirichlet", "shards", "size-skewed")
Row = dict[str, Any]
Columns = Mapping[str, str] | Callable[[Sequence[str]], Mapping[str, str]]


@dataclass(frozen=True)
class ClientDataConfig:
    """Where the rows are and how they are dealt to clients (module docstring)."""

    # your training data: a JSONL / CSV / parquet file, a folder of them, or a list of files (docs/byo.md)
    data: str | tuple[str, ...] = ""
    # held-out data (same forms); empty: eval_fraction of each client's rows
    eval_data: str | tuple[str, ...] = ""
    # with no eval_data, the share of each client's rows held out for evaluation
    eval_fraction: float = 0.1
    # the column naming each row's client (partition = "column")
    client_column: str = ""
    # how rows become clients: "auto", "column", "files", "iid", "dirichlet", "shards" or "size-skewed" (docs/byo.md)
    partition: Literal["auto", "column", "files", "iid", "dirichlet", "shards", "size-skewed"] = "auto"
    num_clients: int = 0  # for the partitioners
    partition_column: str = ""  # dirichlet / shards: the column to skew (default: the task's label)
    # Dirichlet concentration for partition = "dirichlet" / "size-skewed"
    alpha: float = 0.5
    # partition = "shards": label-sorted shards per client (McMahan et al. 2017)
    shards_per_client: int = 2
    min_rows: int = 2  # dirichlet: every client gets at least this many rows

    def __post_init__(self) -> None:
        require(bool(self.files), "data", "names no file: set data = \"rows.jsonl\" (or a list, one file per client)")
        choice(self.partition, "partition", PARTITIONS)
        require(0.0 < self.eval_fraction < 1.0, "eval_fraction", f"must lie in (0, 1), got {self.eval_fraction}")
        require(0 <= self.num_clients <= 100_000, "num_clients", f"must lie in [0, 100000], got {self.num_clients}")
        require(0.0 < self.alpha <= 1e6, "alpha", f"must lie in (0, 1e6], got {self.alpha}")
        require(self.shards_per_client >= 1, "shards_per_client", f"must be >= 1, got {self.shards_per_client}")
        require(self.min_rows >= 0, "min_rows", f"must be >= 0, got {self.min_rows}")
        kind = self.resolved_partition
        if kind == "column":
            require(bool(self.client_column), "client_column", "partition = 'column' needs the column naming each row's client")
        if kind == "files":
            require(len(self.files) >= 1, "data", "partition = 'files' needs a list of files, one per client")
        if kind in ("iid", "dirichlet", "shards", "size-skewed"):
            require(self.num_clients >= 1, "num_clients",
                    f"partition = {kind!r} needs num_clients >= 1 (or set client_column, or list one file per client)")  # fmt: skip
        if self.eval_files and kind == "files":
            require(len(self.eval_files) == len(self.files), "eval_data",
                    f"lists {len(self.eval_files)} files for {len(self.files)} client files; give one per client")  # fmt: skip

    @property
    def files(self) -> tuple[str, ...]:
        return (self.data,) if isinstance(self.data, str) and self.data else tuple(self.data or ())

    @property
    def eval_files(self) -> tuple[str, ...]:
        return (self.eval_data,) if isinstance(self.eval_data, str) and self.eval_data else tuple(self.eval_data or ())

    @property
    def resolved_partition(self) -> str:
        if self.partition != "auto":
            return self.partition
        if self.client_column:
            return "column"
        if len(self.files) > 1:
            return "files"
        return "iid"


@dataclass
class ClientRows:
    name: str
    train: list[Row]
    eval: list[Row]


@dataclass
class Federation:
    clients: list[ClientRows]
    global_eval: list[Row]  # the global test set
    client_tests: bool  # whether each client has its own evaluation rows
    source_columns: list[str]  # the first data file's columns


def _load(files: tuple[str, ...], columns: Columns, extra: Mapping[str, str]):
    """The tables of `files`, each checked for the needed columns, and that map of columns."""
    tables = [load_table(f) for f in files]
    needed = {**(columns(tables[0].column_names) if callable(columns) else columns), **extra}
    for f, t in zip(files, tables):
        require_columns(t, f, needed)
    return tables, needed


def _rows(table) -> list[Row]:
    return table.to_list()


def _by_column(rows: list[Row], column: str, path: str) -> dict[str, list[Row]]:
    groups: dict[Any, list[Row]] = {}
    for r in rows:
        v = r[column]
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{path}: a row has an empty {column!r} (client_column); every row needs its client")
        groups.setdefault(v, []).append(r)
    return {str(k): groups[k] for k in sorted(groups, key=lambda v: (str(type(v)), v))}


def _partition(rows: list[Row], cfg: ClientDataConfig, label: str, seed: int, path: str) -> list[list[Row]]:
    """Flower Datasets' partitioners over one table of rows (with a row index column)."""
    import datasets
    from flwr_datasets import partitioner as fp

    kind, m = cfg.resolved_partition, cfg.num_clients
    if m > len(rows):
        raise DataError(f"{path}: {m} clients (num_clients) but only {len(rows)} rows")
    column = cfg.partition_column or label
    if kind in ("dirichlet", "shards"):
        if not column:
            raise DataError(f"partition = {kind!r}: set partition_column to the column to skew over")
        if column not in rows[0]:
            raise DataError(f"{path}: no column {column!r} (partition_column); the file has columns {list(rows[0])}")
    s = derive_seed(seed, "federate") % (2**31)
    table = datasets.Dataset.from_dict({"__row": list(range(len(rows))),
                                        **({column: [r[column] for r in rows]} if column and column in rows[0] else {})})  # fmt: skip
    if kind == "iid":
        table = table.shuffle(seed=s)
        part = fp.IidPartitioner(num_partitions=m)
    elif kind == "dirichlet":
        part = fp.DirichletPartitioner(num_partitions=m, partition_by=column, alpha=cfg.alpha,
                                       min_partition_size=cfg.min_rows, shuffle=True, seed=s)  # fmt: skip
    elif kind == "shards":
        part = fp.PathologicalPartitioner(num_partitions=m, partition_by=column,
                                          num_classes_per_partition=cfg.shards_per_client, shuffle=True, seed=s)  # fmt: skip
    else:
        table = table.shuffle(seed=s)
        part = fp.ExponentialPartitioner(num_partitions=m)
    part.dataset = table
    try:
        return [[rows[i] for i in part.load_partition(c)["__row"]] for c in range(m)]
    except ValueError as e:
        raise DataError(f"{path}: partition = {kind!r} with {m} clients failed: {e}") from None


def _hold_out(rows: list[Row], fraction: float, rng: np.random.Generator, name: str) -> tuple[list[Row], list[Row]]:
    if len(rows) < 2:
        raise DataError(f"client {name!r} has {len(rows)} row(s): none left for both training and evaluation "
                        "(give it more rows, or eval_data)")  # fmt: skip
    k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(rng.permutation(len(rows))[:k].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def federate(cfg: ClientDataConfig, columns: Columns, seed: int, label: str = "") -> Federation:
    """Clients with training and evaluation rows. `columns` maps each needed column to the field
    that names it (for errors), or is a function of the first data file's column names giving
    that map (a task whose columns depend on the rows' format). `label`: the default
    `partition_column`."""
    kind = cfg.resolved_partition
    extra = {cfg.client_column: "client_column"} if kind == "column" else {}
    tables, needed = _load(cfg.files, columns, extra)
    source = list(tables[0].column_names)
    first = cfg.files[0]
    if kind == "files":
        named = [(Path(f).stem, _rows(t)) for f, t in zip(cfg.files, tables)]
        if len({n for n, _ in named}) < len(named):
            named = [(f"{i}-{n}", rows) for i, (n, rows) in enumerate(named)]
    else:
        rows = [r for t in tables for r in _rows(t)]
        if kind == "column":
            named = list(_by_column(rows, cfg.client_column, first).items())
        else:
            named = [(str(i), part) for i, part in enumerate(_partition(rows, cfg, label, seed, first))]
    for name, rows in named:
        if not rows:
            raise DataError(f"client {name!r} has no training rows (partition = {kind!r})")
    rng = np.random.default_rng(derive_seed(seed, "eval-split"))
    if not cfg.eval_files:
        clients = [ClientRows(n, *_hold_out(rows, cfg.eval_fraction, rng, n)) for n, rows in named]
        return Federation(clients, [r for c in clients for r in c.eval], True, source)
    eval_tables, _ = _load(cfg.eval_files, needed, {})
    if kind == "files":
        clients = [ClientRows(n, rows, _rows(t)) for (n, rows), t in zip(named, eval_tables)]
    elif kind == "column":
        held = _by_column([r for t in eval_tables for r in _rows(t)], cfg.client_column, cfg.eval_files[0])
        clients = [ClientRows(n, rows, held.get(n, [])) for n, rows in named]
        extra = sorted(set(held) - {n for n, _ in named})
        if extra:
            raise DataError(f"{cfg.eval_files[0]}: clients {extra[:5]} have evaluation rows but no training rows in data")
    else:
        pooled = [r for t in eval_tables for r in _rows(t)]
        return Federation([ClientRows(n, rows, []) for n, rows in named], pooled, False, source)
    for c in clients:
        if not c.eval:
            raise DataError(f"client {c.name!r} has no evaluation rows in eval_data")
    return Federation(clients, [r for c in clients for r in c.eval], True, source)
