"""Typed dataclass configs that reject bad fields by name.

Every config in fedlowrank is a frozen dataclass. `from_mapping(cls, data, where)` builds one from
a plain mapping (a TOML table, CLI overrides) and raises `ConfigError` naming the offending key:
unknown keys (with a close match suggested), wrong types and impossible values (each config's
`__post_init__` checks its own ranges with `require`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = ["ConfigError", "from_mapping", "require", "choice"]


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, or out of range."""


T = TypeVar("T")


def require(ok: bool, field: str, message: str) -> None:
    """Raise ConfigError(`field: message`) unless ok."""
    if not ok:
        raise ConfigError(f"{field}: {message}")


def choice(value: str, field: str, allowed: typing.Iterable[str]) -> None:
    allowed = tuple(allowed)
    require(value in allowed, field, f"got {value!r}, allowed: {', '.join(map(repr, allowed))}")


def _check_type(value: Any, tp: Any, field: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choice(value, field, get_args(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{field}: {value!r} matches none of {tp}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_check_type(v, inner, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}: expected a table, got {type(value).__name__} {value!r}")
        return from_mapping(tp, value, where=field)
    return value


def did_you_mean(name: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of `choices` to a misspelt `name`, or ""."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by name."""
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{prefix}{key}: unknown field{did_you_mean(key, fields)}; allowed: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _check_type(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's documentation, read from the source next to the field: the comment
    lines right above it, or the comment at the end of its line (base classes first, so a
    subclass's comment wins). What `fedlowrank show` prints; a test requires one for every
    option of every registered algorithm and task, so they cannot drift apart."""
    import inspect
    import re

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    docs: dict[str, str] = {}
    field_line = re.compile(r"^    (\w+)\s*:[^=#]*(?:=[^#]*)?(?:#\s?(.*))?$")
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in src.splitlines():
            stripped = line.strip()
            if line.startswith("    #") and not line.startswith("     "):
                above.append(stripped.lstrip("#").strip())
                continue
            m = field_line.match(line)
            if m and m.group(1) in names:
                text = " ".join(above) or (m.group(2) or "").strip()
                if text and "fmt:" not in text:
                    docs[m.group(1)] = text
            above = []
    return docs
