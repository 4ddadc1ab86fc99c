"""Every reply a SuperNode sends, checked before the server uses any of it.

A SuperNode is not trusted: its reply may lack records, carry the wrong record types, extra or
missing arrays, a foreign `stype`, metrics of the wrong type or out of range, or text of any
size. Each parser here returns the checked values or raises `BadReply` naming what is wrong;
nothing else escapes (a `KeyError` or `TypeError` inside becomes a `BadReply` too), so a bad
reply can only leave that node out of the round.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedlowrank.flower.common import unpack
from fedlowrank.protocol.messages import CLIENT_DIAGNOSTICS

__all__ = ["BadReply", "MAX_TEXT", "partition_reply", "train_reply", "ack_reply", "eval_reply", "client_error"]

MAX_TEXT = 500  # characters of a node's error text kept in the ledger and the log


class BadReply(ValueError):
    """A node's reply that does not have the form its message asks for."""


def _record(reply: Message, key: str, kind: type) -> Any:
    if key not in reply.content:
        raise BadReply(f"no {key!r} record")
    rec = reply.content[key]
    if not isinstance(rec, kind):
        raise BadReply(f"{key!r} is a {type(rec).__name__}, expected a {kind.__name__}")
    return rec


def _int(rec, key: str, lo: int, hi: int) -> int:
    if key not in rec:
        raise BadReply(f"no {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadReply(f"{key} = {_show(v)}: expected an integer in [{lo}, {hi}]")
    return int(v)


def _float(rec, key: str, lo: float, hi: float = math.inf, allow_nan: bool = False) -> float:
    if key not in rec:
        raise BadReply(f"no {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadReply(f"{key} = {_show(v)}: expected a number")
    v = float(v)
    if math.isnan(v) and allow_nan:
        return v
    if not (math.isfinite(v) and lo <= v <= hi):
        raise BadReply(f"{key} = {_show(v)}: expected a finite number in [{lo}, {hi}]")
    return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:40] + "..."


def _checked(parse):
    def wrapper(*args, **kw):
        try:
            return parse(*args, **kw)
        except BadReply:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a malformed record makes Flower raise
            raise BadReply(f"malformed reply: {type(e).__name__}: {_show(str(e))}") from None
    wrapper.__doc__ = parse.__doc__
    return wrapper


def client_error(reply: Message, round: int) -> tuple[str, int | None] | None:
    """(the node's own error text, the round it says it holds or None) when the reply reports
    an error; None when it is no error report."""
    if "result" not in reply.content:
        return None
    rec = _record(reply, "result", ConfigRecord)
    if "error" not in rec:
        return None
    text = rec["error"]
    if not isinstance(text, str):
        raise BadReply("'error' is not text")
    holds = _int(rec, "holds", -1, round - 1) if "holds" in rec else None
    return text[:MAX_TEXT], holds


@_checked
def partition_reply(reply: Message, num_clients: int) -> tuple[int, int, int]:
    """(partition id, partition count or -1, the round it holds) from a `query.partition` reply."""
    rec = _record(reply, "result", ConfigRecord)
    p = _int(rec, "partition-id", 0, max(0, num_clients - 1))
    of = _int(rec, "num-partitions", -1, 2**31)
    holds = _int(rec, "holds", 0, 2**31) if "holds" in rec else 0
    return p, of, holds


@_checked
def train_reply(reply: Message, round: int) -> tuple[str, int | None] | tuple[bytes, dict[str, Any]]:
    """Either ("error", (text, holds)) or ("ok", (upload bytes, metrics)) from a `train` reply."""
    err = client_error(reply, round)
    if err is not None:
        return "error", err
    try:
        arrays = unpack(_record(reply, "up", ArrayRecord))
    except ValueError as e:
        raise BadReply(f"'up': {_show(str(e))}") from None
    if len(arrays) != 1:
        raise BadReply(f"'up' holds {len(arrays)} arrays, expected exactly one")
    m = _record(reply, "metrics", MetricRecord)
    metrics = {
        "train_loss": _float(m, "train_loss", -math.inf),
        "train_seconds": _float(m, "train_seconds", 0.0),
        "encode_seconds": _float(m, "encode_seconds", 0.0),
        "num_samples": _int(m, "num_samples", 0, 2**62),
        "upload_bound_bytes": _float(m, "upload_bound_bytes", 0.0),
    }
    for k in CLIENT_DIAGNOSTICS:
        if k in m:
            metrics[k] = _float(m, k, -math.inf)
    return "ok", (arrays[0], metrics)


@_checked
def ack_reply(reply: Message, round: int) -> str | None:
    """None when the node acknowledged round `round`'s broadcast; else its error text."""
    err = client_error(reply, round + 1)
    if err is not None:
        return err[0]
    rec = _record(reply, "result", ConfigRecord)
    if _int(rec, "round", 0, 2**31) != round:
        raise BadReply(f"acknowledged round {rec['round']}, not {round}")
    return None


@_checked
def eval_reply(reply: Message, round: int) -> tuple[float, float, int] | str:
    """(accuracy, loss, test samples) from an `evaluate` reply, or the node's error text."""
    err = client_error(reply, round + 1)
    if err is not None:
        return err[0]
    m = _record(reply, "metrics", MetricRecord)
    samples = _int(m, "samples", 0, 2**62)
    return _float(m, "accuracy", 0.0, 1.0, allow_nan=not samples), _float(m, "loss", 0.0, allow_nan=not samples), samples
