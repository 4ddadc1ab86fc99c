"""Run configs: typed, loaded from TOML, overridden with `--set key=value`, checked up front.

A run config names a task, one or more algorithms compared on it with the same seed, and the
runtime's settings:

    name = "news-topics-fedsrd-vs-fedavg"
    seed = 0
    algorithms = ["fedsrd", "fedavg"]

    [task]                  # `name` picks the task; the other keys are its typed config
    name = "news-topics"
    num_clients = 10

    [algorithm.fedsrd]      # options of one algorithm (make_algorithm's typed config)
    upload_sparsity = 0.85

    [sim]                   # fedlowrank.sim.SimConfig
    rounds = 10

Every field is checked before any work starts: an unknown key, a wrong type or an impossible
value raises ConfigError naming the field (`algorithm.fedsrd.upload_sparsity: ...`) and what is
allowed. `dump_toml(config.to_mapping())` writes the resolved config (every default filled in),
which loads back to an equal config.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlowrank.algorithms import ALGORITHMS, make_algorithm
from fedlowrank.config import ConfigError, did_you_mean, from_mapping
from fedlowrank.roundconfig import SimConfig
from fedlowrank.tasks import TASKS, task_config

__all__ = [
    "RunConfig",
    "DEFAULT_PRESET",
    "preset_dirs",
    "list_presets",
    "load_run_config",
    "parse_run_config",
    "apply_overrides",
    "dump_toml",
]

DEFAULT_PRESET = "news-topics-fedsrd-vs-fedavg"
TOP_LEVEL = ("name", "description", "seed", "algorithms", "task", "algorithm", "sim")


@dataclass(frozen=True)
class RunConfig:
    name: str
    seed: int
    algorithms: tuple[str, ...]
    task_name: str
    task: Any  # the task's Config dataclass
    algorithm_options: dict[str, dict[str, Any]]  # resolved, every field, per listed algorithm
    sim: SimConfig
    description: str = ""

    def to_mapping(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "algorithms": list(self.algorithms),
            "task": {"name": self.task_name, **_plain(dataclasses.asdict(self.task))},
            "algorithm": {k: _plain(v) for k, v in self.algorithm_options.items()},
            "sim": _plain(dataclasses.asdict(self.sim)),
        }

    def make_algorithm(self, name: str):
        """The algorithm listed as `name`: a registered name, or a variant label whose
        `[algorithm.LABEL]` table names its registered `base`."""
        opts = dict(self.algorithm_options.get(name, {}))
        return make_algorithm(opts.pop("base", name), opts)


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# presets


def preset_dirs() -> list[Path]:
    """Where presets are looked up: ./configs, then the configs/ folder of this source tree."""
    here = Path(__file__).resolve().parents[2] / "configs"
    dirs = [Path.cwd() / "configs", here]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def list_presets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in preset_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def _resolve_source(source: str | None) -> Path:
    if source is None:
        source = DEFAULT_PRESET
    p = Path(source)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file {source!r} does not exist")
        return p
    presets = list_presets()
    if source not in presets:
        raise ConfigError(f"unknown preset {source!r}{did_you_mean(source, presets)}; available: {', '.join(sorted(presets)) or 'none'}")
    return presets[source]


# --------------------------------------------------------------------------------------------
# overrides


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys from `key=value` strings; values are TOML (`0.9`, `true`, `["a"]`) or a bare string."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. sim.rounds=5")
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a table")
            node = nxt
        node[parts[-1]] = _parse_value(text.strip())
    return raw


# --------------------------------------------------------------------------------------------
# parsing


def _unknown(key: str, allowed: Sequence[str], where: str = "") -> ConfigError:
    return ConfigError(f"{where}{key}: unknown field{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")


def _variant_base(label: str, options: Mapping[str, Any], where: str = "algorithms") -> str:
    """The registered algorithm behind `label`: itself, or its table's `base` (a variant)."""
    opts = options.get(label, {})
    base = opts.get("base", label) if isinstance(opts, Mapping) else label
    if base not in ALGORITHMS:
        if label == base:
            what = f"algorithms: unknown algorithm {label!r}" if where == "algorithms" else f"algorithm.{label}: unknown algorithm"
            raise ConfigError(
                f"{what}{did_you_mean(label, ALGORITHMS)}; available: {', '.join(sorted(ALGORITHMS))} "
                f"(or a variant label with `base = \"NAME\"` in its [algorithm.{label}] table)"
            )
        raise ConfigError(f"algorithm.{label}.base: unknown algorithm {base!r}{did_you_mean(base, ALGORITHMS)}; available: {', '.join(sorted(ALGORITHMS))}")
    return base


_SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+.-]{0,63}")  # a safe path component: no "..", "/", NUL


def _algorithms(value: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"algorithms: expected a non-empty list of algorithm names, got {value!r}")
    for v in value:
        if not _SAFE_LABEL.fullmatch(v):
            raise ConfigError(f"algorithms: {v!r} is not a usable name (it names a run folder): use letters, digits, "
                              "'-', '_', '+' and '.', starting with a letter or digit, at most 64 characters")  # fmt: skip
        _variant_base(v, options)
    if len(set(value)) != len(value):
        raise ConfigError(f"algorithms: names repeat in {list(value)}")
    return tuple(value)


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from a plain mapping (a parsed TOML file), every field checked."""
    for key in raw:
        if key not in TOP_LEVEL:
            raise _unknown(key, TOP_LEVEL)
    name = raw.get("name", "run")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"name: expected a non-empty string without '/', got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"description: expected a string, got {description!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed: expected an integer in [0, 2^63), got {seed!r}")

    task = raw.get("task")
    if not isinstance(task, Mapping) or "name" not in task:
        raise ConfigError(f"task.name: required; available: {', '.join(sorted(TASKS))}")
    task = dict(task)
    task_name = task.pop("name")
    if not isinstance(task_name, str):
        raise ConfigError(f"task.name: expected a string, got {task_name!r}")
    tcfg = task_config(task_name, task)

    options = raw.get("algorithm", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"algorithm: expected a table of [algorithm.NAME] tables, got {options!r}")
    for alg, opts in options.items():
        if not isinstance(opts, Mapping):
            raise ConfigError(f"algorithm.{alg}: expected a table of options, got {opts!r}")
        _variant_base(alg, options, where="algorithm")
    algorithms = _algorithms(raw.get("algorithms", ["fedsrd"]), options)
    resolved = {}
    for alg in algorithms:
        opts = dict(options.get(alg, {}))
        base = opts.pop("base", alg)
        built = make_algorithm(base, opts)  # raises naming algorithm.<base>.<field>
        resolved[alg] = ({"base": base} if base != alg else {}) | dataclasses.asdict(built.config)

    sim = raw.get("sim", {})
    if not isinstance(sim, Mapping):
        raise ConfigError(f"sim: expected a table, got {sim!r}")
    return RunConfig(
        name=name,
        seed=seed,
        algorithms=algorithms,
        task_name=task_name,
        task=tcfg,
        algorithm_options=resolved,
        sim=from_mapping(SimConfig, sim, where="sim"),
        description=description,
    )


def load_run_config(source: str | None = None, overrides: Sequence[str] = ()) -> tuple[RunConfig, Path]:
    """Load a preset name or a TOML file (default: the default preset), apply `--set` overrides."""
    path = _resolve_source(source)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_run_config(apply_overrides(raw, overrides)), path


# --------------------------------------------------------------------------------------------
# writing TOML (the resolved config of a run)


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: cannot write non-finite float {v} to TOML")
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    raise ValueError(f"{where}: cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else _toml_value(k, k)


def dump_toml(data: Mapping[str, Any]) -> str:
    """A TOML document for nested dicts of scalars and lists (tables after plain keys)."""
    lines: list[str] = []

    def table(d: Mapping[str, Any], path: list[str]) -> None:
        plain = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
        subs = {k: v for k, v in d.items() if isinstance(v, Mapping)}
        if path and (plain or not subs):
            lines.append(f"\n[{'.'.join(_toml_key(p) for p in path)}]")
        for k, v in plain.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v, '.'.join(path + [k]))}")
        for k, v in subs.items():
            table(v, path + [k])

    table(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"
