"""What `fedlowrank show NAME` prints: an algorithm's, a task's or the `[sim]` table's options,
with their types, defaults and meaning, generated from the config dataclasses themselves
(`fedlowrank.config.field_docs` reads the comment next to each field), so they cannot drift."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from fedlowrank.config import ConfigError, did_you_mean, field_docs

__all__ = ["Option", "Described", "describe", "type_name"]


@dataclass(frozen=True)
class Option:
    name: str
    type: str
    default: str
    doc: str


@dataclass(frozen=True)
class Described:
    kind: str  # "algorithm", "task" or "sim"
    name: str
    description: str
    table: str  # where its options go in a run config
    options: list[Option]


def type_name(tp: object) -> str:
    """A reader's name for a field's type: `"a" | "b"` for a Literal, `list of str` for a tuple."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a).replace("'", '"') for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _default(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    return repr(value)


def _options(cls: type, defaults: object | None = None) -> list[Option]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "(required)"
        out.append(Option(f.name, type_name(hints[f.name]), _default(value), docs.get(f.name, "")))
    return out


def describe(name: str) -> Described:
    """The options of algorithm `name`, task `name`, or "sim"; ConfigError (with a did-you-mean)
    for anything else."""
    from fedlowrank.algorithms import ALGORITHMS, algorithm_description
    from fedlowrank.roundconfig import SimConfig
    from fedlowrank.tasks import TASKS, task_class

    if name in ALGORITHMS:
        cls = ALGORITHMS[name]
        return Described("algorithm", name, algorithm_description(cls), f"[algorithm.{name}]",
                         _options(cls.Config, cls(None).config))  # fmt: skip
    if name in TASKS:
        return Described("task", name, TASKS[name][1], f'[task] name = "{name}"', _options(task_class(name).Config))
    if name == "sim":
        return Described("sim", "sim", "the runtime: rounds, sampling, wire formats, the outlier bound", "[sim]",
                         _options(SimConfig))  # fmt: skip
    known = [*ALGORITHMS, *TASKS, "sim"]
    raise ConfigError(f"show: {name!r} is not an algorithm, a task or \"sim\"{did_you_mean(name, known)}; "
                      f"`fedlowrank list` lists them")  # fmt: skip
