"""What the Flower ServerApp and ClientApp share: the wire wrapping and the run config mapping.

Codec bytes travel as a Flower `Array` of dtype uint8 whose `stype` is `STYPE`: Flower counts
`len(data)` for it, the same number our ledger counts. Flower's own `.numpy()` refuses that
stype; only `fedlowrank.codec.decode_payload` reads it.

Flower run config keys (`[tool.flwr.app.config]`, or `flwr run . --run-config "k=v ..."`):

    config            a preset name or a path to a run config TOML (default "digits-all")
    algorithm         which of the config's algorithms to run ("" = all of them, in order)
    set               `--set`-style overrides separated by ";" ("sim.rounds=2;task.num_clients=2")
    num-server-rounds overrides sim.rounds when > 0
    out-dir           the run directory ("" = runs/<name>-flower-<time>)
    resume            continue the run in out-dir from its checkpoints (default false)
    round-timeout     seconds to wait for the replies of one round's messages
    nodes-timeout     seconds to wait at the start for a SuperNode per data partition
    log-level         the ServerApp's own lines: DEBUG, INFO (one per round, the default), WARNING, ERROR
    watch-pid         > 0: stop after the round in which this process (on the ServerApp's machine)
                      is found gone; `fedlowrank run --runtime flower` sets its own pid (default 0)

SuperNodes say which data partition (client id) they hold with the node config key
`partition-id` (Flower's simulation engine sets it for every virtual node).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Array, ArrayRecord

from fedlowrank.config import ConfigError

__all__ = ["STYPE", "FINISHED", "FlowerRunOptions", "pack", "unpack", "state_to_bytes", "state_from_bytes"]

STYPE = "fedlowrank.codec/v1"  # an Array holding one encoded payload (fedlowrank.codec)
FINISHED = "fedlowrank: finished; run directory"  # the ServerApp's last line after a complete run


def pack(payloads: list[bytes]) -> ArrayRecord:
    """Encoded payloads, in order, as one ArrayRecord ("0", "1", ...)."""
    return ArrayRecord({str(i): Array(dtype="uint8", shape=(len(b),), stype=STYPE, data=b) for i, b in enumerate(payloads)})


def unpack(record: ArrayRecord) -> list[bytes]:
    """The payloads `pack` wrapped; ValueError unless the record is exactly that (arrays "0" ..
    "n-1", each uint8 of our stype)."""
    if sorted(record.keys()) != sorted(str(i) for i in range(len(record))):
        raise ValueError(f"arrays {sorted(record.keys())[:4]}, expected '0' .. '{len(record) - 1}'")
    out = []
    for i in range(len(record)):
        a = record[str(i)]
        if a.stype != STYPE or a.dtype != "uint8":
            raise ValueError(f"array {i}: stype {a.stype!r}, dtype {a.dtype!r}; expected {STYPE!r}, uint8")
        out.append(bytes(a.data))
    return out


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A client's private state (kept in Flower's `context.state`, never sent): exact, any dtype."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class FlowerRunOptions:
    """The Flower run config, typed. Unknown keys are errors (a typo must not be ignored)."""

    config: str = "digits-all"
    algorithm: str = ""
    set: str = ""
    num_server_rounds: int = 0
    out_dir: str = ""
    round_timeout: float = 300.0
    nodes_timeout: float = 60.0
    log_level: str = "INFO"  # the ServerApp's own log lines (one per round); WARNING: quiet
    resume: bool = False
    watch_pid: int = 0  # > 0: the ServerApp stops after a round once this process is gone

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FlowerRunOptions":
        fields = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        kw: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in fields:
                raise ConfigError(f"Flower run config: unknown key {key!r}; known: {', '.join(sorted(fields))}")
            kind = type(getattr(cls, fields[key]))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ConfigError(f"Flower run config: {key} must be {kind.__name__}, got {value!r}")
            kw[fields[key]] = value
        opts = cls(**kw)
        if opts.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"Flower run config: log-level must be DEBUG, INFO, WARNING or ERROR, got {opts.log_level!r}")
        if opts.num_server_rounds < 0 or opts.watch_pid < 0 or opts.round_timeout <= 0 or opts.nodes_timeout <= 0:
            raise ConfigError("Flower run config: num-server-rounds and watch-pid must be >= 0, the timeouts > 0")
        return opts

    def overrides(self) -> list[str]:
        out = [s.strip() for s in self.set.split(";") if s.strip()]
        if self.num_server_rounds:
            out.append(f"sim.rounds={self.num_server_rounds}")
        return out
