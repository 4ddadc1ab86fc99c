"""Local data files as Hugging Face `datasets` tables, strictly offline.

`load_table(path)` reads one file by its suffix: `.jsonl` (one JSON object per line), `.json`
(a list of objects, or JSON lines), `.csv`, `.parquet`. Nothing is ever fetched: `offline()`
sets the Hugging Face offline switches (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`,
`TRANSFORMERS_OFFLINE`) before `datasets` or `transformers` is used, and tables are read into
memory (the `datasets` cache goes under $FEDLOWRANK_CACHE, never the home folder).

Every problem is a `DataError` (a `ConfigError`: the CLI reports it as a config error and
exits 2 before any training) naming the file and, where it applies, the line or the column:
a missing or empty file, an unknown suffix, invalid JSON (with its line number), a missing
column (with the columns the file has).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError
from fedlowrank.data.packages import cache_dir

__all__ = ["DataError", "offline", "load_table", "require_columns", "FORMATS"]

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ConfigError):
    """A data file or column is missing, empty or malformed."""


def offline() -> None:
    """Switch Hugging Face libraries to offline mode (nothing may be downloaded at run time)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _check_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: item {bad} of the JSON list is not an object")
        return rows
    return _check_json_lines(path)


def load_table(path: str | Path):
    """The rows of one local file as a `datasets.Dataset` (in memory)."""
    offline()
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: data file is empty")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if fmt == "json":
        rows = _read_json(path)
        if not rows:
            raise DataError(f"{path}: data file has no rows")
        try:
            table = datasets.Dataset.from_list(rows)
        except Exception as e:  # noqa: BLE001 - pyarrow's schema errors, e.g. mixed types
            raise DataError(f"{path}: rows do not form one table ({type(e).__name__}: {e})") from None
    else:
        try:
            table = datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True,
                                          cache_dir=str(cache_dir() / "hf-datasets"))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's
            cause = e.__cause__ or e
            raise DataError(f"{path}: cannot read as {fmt} ({type(cause).__name__}: {cause})") from None
    if len(table) == 0:
        raise DataError(f"{path}: data file has no rows")
    return table


def require_columns(table, path: str | Path, columns: Mapping[str, str]) -> None:
    """DataError naming the first column of `columns` (column -> the config field naming it)
    that `table` lacks, and the columns it has."""
    have: Sequence[str] = table.column_names
    for column, field in columns.items():
        if column not in have:
            raise DataError(f"{path}: no column {column!r} ({field}); the file has columns {list(have)}")
