"""LSTM whose input and recurrent weights are FedPara (or same-budget low-rank) matrices.

Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022, Sec. 3.1 applied to recurrent layers: per layer l, the stacked
gate matrices W_ih (4H, I_l) and W_hh (4H, H) are each one FedPara matrix
(X1 Y1^T) * (X2 Y2^T), with their own inner rank from the gamma rule (rank.py). The gates are
PyTorch's, in PyTorch's order (i, f, g, o):

    g_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          (N, 4H)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(c_t)

``FedParaLSTM`` is a drop-in for a unidirectional ``nn.LSTM`` (any num_layers, batch_first,
dropout, unbatched inputs, optional (h0, c0)); ``FedParaLSTMCell`` for ``nn.LSTMCell``.
``low_rank=True`` builds the conventional low-rank baseline instead (rank 2R, same budget).
Init follows nn.LSTM's scale: the built matrices get variance 1 / (3H), that of U(-1/sqrt(H),
1/sqrt(H)); the biases are drawn from that uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FedParaLinear
from .lowrank import LowRankLinear

__all__ = ["FedParaLSTMCell", "FedParaLSTM"]


def _lstm_step(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from pre-activations (N, 4H) and the cell state (N, H) -> (h, c)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class FedParaLSTMCell(nn.Module):
    """One LSTM layer's weights: ``ih`` (4H x I) and ``hh`` (4H x H) factorised, plus biases.

    Called like ``nn.LSTMCell``: (input (N, I) or (I,), optional (h, c)) -> (h, c).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        rank: int | None = None,
        gamma: float | None = None,
        nonlinear: bool = False,
        low_rank: bool = False,
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__()
        where = name or f"FedParaLSTMCell({input_size}, {hidden_size})"
        self.input_size, self.hidden_size, self.low_rank = input_size, hidden_size, bool(low_rank)
        kw = {"rank": rank, "gamma": gamma, "bias": False, "device": device, "dtype": dtype}
        if low_rank:
            if nonlinear:
                raise ValueError(f"{where}: nonlinear applies to FedPara, not to low_rank=True")
            self.ih = LowRankLinear(input_size, 4 * hidden_size, name=f"{where}.ih", **kw)
            self.hh = LowRankLinear(hidden_size, 4 * hidden_size, name=f"{where}.hh", **kw)
        else:
            self.ih = FedParaLinear(input_size, 4 * hidden_size, nonlinear=nonlinear, name=f"{where}.ih", **kw)
            self.hh = FedParaLinear(hidden_size, 4 * hidden_size, nonlinear=nonlinear, name=f"{where}.hh", **kw)
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, device=device, dtype=dtype))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @property
    def ranks(self) -> tuple[int, int]:
        return self.ih.rank, self.hh.rank

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.ih.reset_parameters(bound * bound / 3.0)  # variance of U(-bound, bound)
        self.hh.reset_parameters(bound * bound / 3.0)
        for b in (self.bias_ih, self.bias_hh):
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        unbatched = input.dim() == 1
        x = input[None] if unbatched else input  # (N, I)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            h, c = zeros, zeros
        else:
            h, c = (t[None] if unbatched else t for t in hx)
        gates = F.linear(x, self.ih.weight, self.bias_ih) + F.linear(h, self.hh.weight, self.bias_hh)
        h, c = _lstm_step(gates, c)
        return (h[0], c[0]) if unbatched else (h, c)


class FedParaLSTM(nn.Module):
    """Drop-in for a unidirectional ``nn.LSTM`` with FedPara input and recurrent weights.

    ``forward(input, hx=None) -> (output, (h_n, c_n))`` with nn.LSTM's shapes: input (L, N, I),
    (N, L, I) with batch_first, or unbatched (L, I); h_n, c_n (num_layers, N, H) or (num_layers, H).
    Parameters ``layers.{l}.ih.*``, ``layers.{l}.hh.*``, ``layers.{l}.bias_ih``, ``layers.{l}.bias_hh``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        rank: int | None = None,
        gamma: float | None = None,
        nonlinear: bool = False,
        low_rank: bool = False,
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__()
        where = name or f"FedParaLSTM({input_size}, {hidden_size}, num_layers={num_layers})"
        for label, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {label} must be a positive int, got {v!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout <= 1.0):
            raise ValueError(f"{where}: dropout must lie in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.layers = nn.ModuleList(
            FedParaLSTMCell(
                input_size if i == 0 else hidden_size, hidden_size, bias, rank, gamma, nonlinear, low_rank,
                device, dtype, name=f"{where}.layers.{i}",
            )  # fmt: skip
            for i in range(num_layers)
        )

    @property
    def ranks(self) -> tuple[int, ...]:
        """(R_ih, R_hh) of every layer, flattened."""
        return tuple(r for cell in self.layers for r in cell.ranks)

    def forward(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if input.dim() not in (2, 3):
            raise ValueError(f"FedParaLSTM: expected a 2-D (unbatched) or 3-D input, got shape {tuple(input.shape)}")
        unbatched = input.dim() == 2
        x = input[:, None] if unbatched else (input.transpose(0, 1) if self.batch_first else input)  # (L, N, I)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"FedParaLSTM: input has {x.shape[-1]} features, expected {self.input_size}")
        n = x.shape[1]
        state_shape = (self.num_layers, n, self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(state_shape)
        else:
            h0, c0 = (t[:, None] if unbatched else t for t in hx)
            if tuple(h0.shape) != state_shape or tuple(c0.shape) != state_shape:
                want = (self.num_layers, self.hidden_size) if unbatched else state_shape
                raise ValueError(
                    f"FedParaLSTM: hx must be two tensors of shape {want}, "
                    f"got {tuple(hx[0].shape)} and {tuple(hx[1].shape)}"
                )
        h_n, c_n = [], []
        for li, cell in enumerate(self.layers):
            w_hh = cell.hh.weight  # (4H, H), built once per sequence
            gx = F.linear(x, cell.ih.weight, cell.bias_ih)  # (L, N, 4H), all steps at once
            h, c = h0[li], c0[li]  # (N, H)
            outs = []
            for t in range(x.shape[0]):
                h, c = _lstm_step(gx[t] + F.linear(h, w_hh, cell.bias_hh), c)
                outs.append(h)
            x = torch.stack(outs)  # (L, N, H)
            if self.dropout > 0 and self.training and li < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)  # (num_layers, N, H)
        if unbatched:
            return x[:, 0], (h_n[:, 0], c_n[:, 0])
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}, ranks={self.ranks}"
        )
