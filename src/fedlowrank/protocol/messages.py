"""What travels between the two sides of a round, and the typed per-client ledger record.

Only the `bytes` fields are payloads on the wire (`fedlowrank.codec`); the rest is the small
control data a transport carries beside them (round, client, catch-up kind, training stats).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedlowrank.codec import encode_payload_with_stats
from fedlowrank.payload import Payload

__all__ = ["Encoded", "encode", "TrainOrder", "TrainResult", "EvalResult", "ClientRound", "client_diagnostics",
           "CLIENT_DIAGNOSTICS"]  # fmt: skip

CLIENT_DIAGNOSTICS = ("upload_kept_energy",)


@dataclass(frozen=True)
class Encoded:
    """A payload's wire bytes and its information bound (k value bits + log2 C(n, k), in bytes)."""

    data: bytes
    bound_bytes: float

    def __len__(self) -> int:
        return len(self.data)


def encode(payload: Payload, positions: str, value_dtype: str) -> Encoded:
    data, stats = encode_payload_with_stats(payload, positions, value_dtype)
    return Encoded(data, float(stats["bound_bytes"]))


def client_diagnostics(stats: Mapping[str, Any]) -> dict[str, float]:
    """The diagnostics a client's upload reported (Payload.stats), for its round record."""
    return {k: float(stats[k]) for k in CLIENT_DIAGNOSTICS if k in stats}


@dataclass(frozen=True)
class TrainOrder:
    """Server to client: bring yourself from round `base` to `round - 1` with `data` (the full
    state, or the broadcasts of `rounds`), then train for `round`. Also used, with `round` one
    past the current round, to bring a client up to date for evaluation."""

    round: int
    client: int
    base: int  # the round the server believes the client holds
    catchup: str  # "none" | "state" | "deltas"
    rounds: tuple[int, ...] = ()  # the rounds of the broadcasts in `data` (catchup "deltas")
    data: tuple[bytes, ...] = ()
    bound_bytes: float = 0.0

    @property
    def download_bytes(self) -> int:
        return sum(len(b) for b in self.data)


@dataclass(frozen=True)
class TrainResult:
    """Client to server: the encoded upload and what training reported, or an `error` (the
    client is left out of the round). `holds` is the round the client holds afterwards as far as
    anyone knows: `round - 1` once it applied the catch-up, `base` if it did not (send it again),
    -1 if unknown (it gets the full state next time)."""

    client: int
    holds: int
    upload: bytes = b""
    bound_bytes: float = 0.0
    train_loss: float = 0.0
    train_seconds: float = 0.0
    encode_seconds: float = 0.0
    num_samples: int = 0
    diagnostics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    node_id: int | None = None  # Flower: the SuperNode that answered


@dataclass(frozen=True)
class EvalResult:
    """A client's evaluation of its own model (the global sent keys plus its local keys) on its
    own test split, and the catch-up bytes it was sent for it (0 in-process)."""

    client: int
    accuracy: float
    loss: float
    samples: int
    download_bytes: int = 0


@dataclass
class ClientRound:
    """One sampled client's line in a round's ledger (`per_client` in metrics.jsonl)."""

    client: int
    status: str = "ok"  # ok | failed (no upload) | rejected (upload did not decode)
    download_bytes: int = 0
    download_bound_bytes: float = 0.0
    catchup: str = "none"
    upload_bytes: int = 0
    upload_bound_bytes: float = 0.0
    reason: str | None = None
    train_loss: float | None = None
    train_seconds: float | None = None
    encode_seconds: float | None = None
    num_samples: int | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    node_id: int | None = None  # Flower: the SuperNode that trained

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason

    def trained(self, result: TrainResult) -> None:
        """Fill in what the client's successful training reported."""
        self.train_loss, self.train_seconds = result.train_loss, result.train_seconds
        self.encode_seconds, self.num_samples = result.encode_seconds, result.num_samples
        self.diagnostics = dict(result.diagnostics)
        self.upload_bytes, self.upload_bound_bytes = len(result.upload), result.bound_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("diagnostics"))
        return {k: v for k, v in d.items() if v is not None}
