"""The `[sim]` table of a run config: how rounds run (clients per round, evaluation, the wire
encodings). Read by both runtimes and by the run config, so it sits below all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedlowrank.codec import VALUE_DTYPES
from fedlowrank.config import choice, require

__all__ = ["SimConfig", "POSITIONS"]


@dataclass(frozen=True)
class SimConfig:
    """The runtime's knobs (the `[sim]` table of a run config)."""

    # federated rounds to run
    rounds: int = 10
    clients_per_round: int = 0  # 0: use `fraction`
    fraction: float = 1.0  # of all clients, at least one
    eval_every: int = 1  # evaluate every N rounds, and always after the last
    evaluation: Literal["auto", "global", "clients"] = "auto"  # auto: clients iff local keys exist
    # how uploads send positions: "auto" (the smaller of golomb and dense per tensor), "golomb", "bitmap" or "dense"
    upload_positions: Literal["auto", "golomb", "bitmap", "dense"] = "auto"
    # upload values on the wire: fp32 (exact), bf16 or fp16
    upload_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # as upload_positions, for broadcasts
    download_positions: Literal["auto", "golomb", "bitmap", "dense"] = "auto"
    # broadcast values on the wire (full-state catch-ups are always fp32)
    download_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # every client keeps its own copy built from the bytes it was sent, checked against the server's before it trains (slow; tests)
    verify_sync: bool = False
    threads: int = 0  # torch threads during the run; 0: the task's choice (tiny models: 1)
    # a bound on one client's influence: an upload whose norm exceeds `outlier_ratio` times the
    # median norm of the round's uploads (3 or more) is rejected, or scaled down to that bound
    # ("clip"); 0 turns the bound off
    outlier_ratio: float = 10.0
    # what happens to an upload above the outlier bound: "reject" or "clip" (scaled down to it)
    outliers: Literal["reject", "clip"] = "reject"

    def __post_init__(self) -> None:
        require(1 <= self.rounds <= 1_000_000, "rounds", f"must lie in [1, 1000000], got {self.rounds}")
        require(self.clients_per_round >= 0, "clients_per_round", f"must be >= 0, got {self.clients_per_round}")
        require(0.0 < self.fraction <= 1.0, "fraction", f"must lie in (0, 1], got {self.fraction}")
        require(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        choice(self.evaluation, "evaluation", ("auto", "global", "clients"))
        choice(self.upload_positions, "upload_positions", POSITIONS)
        choice(self.download_positions, "download_positions", POSITIONS)
        choice(self.upload_dtype, "upload_dtype", tuple(VALUE_DTYPES))
        choice(self.download_dtype, "download_dtype", tuple(VALUE_DTYPES))
        require(0 <= self.threads <= 1024, "threads", f"must lie in [0, 1024], got {self.threads}")
        require(self.outlier_ratio == 0 or 1.0 <= self.outlier_ratio <= 1e6, "outlier_ratio",
                f"must be 0 (off) or lie in [1, 1e6], got {self.outlier_ratio}")  # fmt: skip
        choice(self.outliers, "outliers", ("reject", "clip"))


POSITIONS = ("auto", "golomb", "bitmap", "dense")  # auto: per tensor the smaller of golomb and dense
