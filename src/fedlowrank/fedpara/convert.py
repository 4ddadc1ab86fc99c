"""Turn any ``nn.Module`` into its FedPara (or pFedPara, or low-rank) counterpart.

``fedparaize(model, gamma)`` replaces the ``nn.Linear``, ``nn.Conv2d`` (groups=1) and
unidirectional ``nn.LSTM`` layers of a model by FedPara layers (Hyeon-Woo, Ye-Bin, Oh, "FedPara:
Low-Rank Hadamard Product for Communication-Efficient Federated Learning", ICLR 2022) whose inner
ranks come from the gamma rule (rank.py), and returns the new model with a table of per-layer
ranks and parameter counts. New layers are freshly initialised (FedPara trains from scratch, as
in the paper; a dense weight has no exact FedPara form to copy) on the original layer's device
and dtype.

Which layers: ``include`` (default: every supported layer) and ``exclude`` are sequences whose
entries are module types (``nn.Conv2d``) or glob patterns on qualified module names
(``"features.*"``, ``"classifier.2"``); a layer is replaced when it is of a supported type
(exactly: subclasses such as attention's out_proj are left alone), matches an include entry and
matches no exclude entry.

The table has one row per module that holds parameters itself, replaced or not, so its
``total_after`` equals the new model's parameter count (shared parameters counted once).
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from torch import nn

from .layers import FedParaConv2d, FedParaLinear
from .lowrank import LowRankConv2d, LowRankLinear
from .lstm import FedParaLSTM
from .pfedpara import PFedParaConv2d, PFedParaLinear

__all__ = ["LayerRow", "ConversionTable", "fedparaize", "KINDS"]

KINDS = ("fedpara", "pfedpara", "lowrank")
_SUPPORTED = (nn.Linear, nn.Conv2d, nn.LSTM)


@dataclass(frozen=True)
class LayerRow:
    """One module of the converted model that holds parameters.

    ranks: the new layer's rank(s) (FedPara inner rank R, low-rank r; an LSTM lists R_ih, R_hh
    per layer); empty when not replaced. note: why a supported-looking layer was left alone.
    """

    name: str
    layer: str  # original type
    new_layer: str  # replacement type (the original type when not replaced)
    shape: str  # e.g. "512x256x3x3" (out x in x kh x kw)
    ranks: tuple[int, ...]
    params_before: int
    params_after: int
    note: str = ""

    @property
    def replaced(self) -> bool:
        return self.layer != self.new_layer


@dataclass
class ConversionTable:
    rows: list[LayerRow] = field(default_factory=list)

    @property
    def total_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def total_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def replaced(self) -> list[LayerRow]:
        return [r for r in self.rows if r.replaced]

    def to_markdown(self) -> str:
        lines = [
            "| layer | type | new type | shape | rank | params before | params after | note |",
            "|---|---|---|---|---|---:|---:|---|",
        ]
        for r in self.rows:
            ranks = "/".join(map(str, r.ranks)) or "-"
            lines.append(
                f"| {r.name or '(root)'} | {r.layer} | {r.new_layer} | {r.shape} | {ranks} | "
                f"{r.params_before:,} | {r.params_after:,} | {r.note} |"
            )
        lines.append(
            f"| **total** | | | | | {self.total_before:,} | {self.total_after:,} | "
            f"{self.total_after / max(self.total_before, 1):.3f} of the original |"
        )
        return "\n".join(lines)

    __str__ = to_markdown


def _matches(name: str, module: nn.Module, entries: Iterable) -> bool:
    for e in entries:
        if isinstance(e, type):
            if isinstance(module, e):
                return True
        elif isinstance(e, str):
            if fnmatch.fnmatchcase(name, e):
                return True
        else:
            raise ValueError(f"fedparaize: include/exclude entries must be module types or glob strings, got {e!r}")
    return False


def _shape(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"{m.out_features}x{m.in_features}"
    if isinstance(m, nn.Conv2d):
        return f"{m.out_channels}x{m.in_channels}x{m.kernel_size[0]}x{m.kernel_size[1]}"
    if isinstance(m, nn.LSTM):
        return f"LSTM {m.input_size}->{m.hidden_size} x{m.num_layers}"
    return ""


def _unsupported_reason(m: nn.Module, kind: str) -> str:
    if type(m) not in _SUPPORTED:
        return f"subclass of {type(m).__mro__[1].__name__}; left as is" if isinstance(m, _SUPPORTED) else ""
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return "grouped convolution; left as is"
    if isinstance(m, nn.LSTM):
        if m.bidirectional or m.proj_size:
            return "bidirectional/projected LSTM not supported; left as is"
        if kind == "pfedpara":
            return "no pFedPara LSTM; left as is"
    return ""


def _replacement(m: nn.Module, name: str, kind: str, rank, gamma, nonlinear: bool, local_bias: bool) -> nn.Module:
    p = next(m.parameters(), None)
    kw = {"rank": rank, "gamma": gamma, "device": p.device if p is not None else None,
          "dtype": p.dtype if p is not None else None, "name": name or type(m).__name__}  # fmt: skip
    if isinstance(m, nn.LSTM):
        return FedParaLSTM(
            m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.dropout,
            nonlinear=nonlinear, low_rank=kind == "lowrank", **kw,
        )  # fmt: skip
    bias = m.bias is not None
    extra = {"nonlinear": nonlinear} if kind != "lowrank" else {}
    if kind == "pfedpara":
        extra["local_bias"] = local_bias
    if isinstance(m, nn.Linear):
        cls = {"fedpara": FedParaLinear, "pfedpara": PFedParaLinear, "lowrank": LowRankLinear}[kind]
        return cls(m.in_features, m.out_features, bias=bias, **extra, **kw)
    cls = {"fedpara": FedParaConv2d, "pfedpara": PFedParaConv2d, "lowrank": LowRankConv2d}[kind]
    return cls(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=bias, dilation=m.dilation,
        padding_mode=m.padding_mode, **extra, **kw,
    )  # fmt: skip


def _ranks(m: nn.Module) -> tuple[int, ...]:
    return tuple(m.ranks) if isinstance(m, FedParaLSTM) else (m.rank,)


def fedparaize(
    model: nn.Module,
    gamma: float | None = None,
    include: Sequence | None = None,
    exclude: Sequence = (),
    *,
    rank: int | None = None,
    kind: str = "fedpara",
    nonlinear: bool = False,
    local_bias: bool = False,
    inplace: bool = False,
) -> tuple[nn.Module, ConversionTable]:
    """Replace the Linear/Conv2d/LSTM layers of ``model``; return (new model, table).

    Args:
        gamma: rank-rule parameter in [0, 1], applied per layer; ``rank`` (one inner rank for
            every layer) overrides it. One of the two is required.
        include, exclude: module types and/or glob patterns on module names (see module doc).
        kind: "fedpara", "pfedpara" (W1 * (W2 + 1); LSTMs left as is) or "lowrank" (the
            same-budget conventional low-rank baseline).
        nonlinear: tanh on each factor (FedPara/pFedPara). local_bias: pFedPara biases stay local.
        inplace: modify ``model`` itself instead of a deep copy.
    """
    if kind not in KINDS:
        raise ValueError(f"fedparaize: kind must be one of {KINDS}, got {kind!r}")
    if rank is None and gamma is None:
        raise ValueError("fedparaize: give gamma= (in [0, 1]) or rank=")
    new = model if inplace else copy.deepcopy(model)
    include = _SUPPORTED if include is None else tuple(include)
    exclude = tuple(exclude)

    rows: list[LayerRow] = []
    seen: set[int] = set()  # parameter ids already counted
    swaps: list[tuple[str, nn.Module]] = []
    done: dict[int, nn.Module] = {}  # id(old module) -> replacement, for modules reachable twice
    for name, m in new.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        count = sum(p.numel() for p in own)
        wanted = isinstance(m, _SUPPORTED) and _matches(name, m, include) and not _matches(name, m, exclude)
        reason = _unsupported_reason(m, kind) if wanted else ""
        if wanted and not reason:
            repl = _replacement(m, name, kind, rank, gamma, nonlinear, local_bias)
            done[id(m)] = repl
            swaps.append((name, repl))
            after = sum(p.numel() for p in repl.parameters())
            rows.append(LayerRow(name, type(m).__name__, type(repl).__name__, _shape(m), _ranks(repl), count, after))
        elif own:
            t = type(m).__name__
            rows.append(LayerRow(name, t, t, _shape(m), (), count, count, reason))
    for name, repl in swaps:
        if not name:
            new = repl  # the model itself is a single layer
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(new.get_submodule(parent_name), child, repl)
    # a module registered under several names: point every alias at the same replacement
    for name, m in list(new.named_modules(remove_duplicate=False)):
        for child_name, child in list(m.named_children()):
            if id(child) in done:
                setattr(m, child_name, done[id(child)])
    return new, ConversionTable(rows)
