"""FedParaLSTM / FedParaLSTMCell: parity with nn.LSTM given the built weights, ranks, gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedlowrank.fedpara import FedParaLSTM, FedParaLSTMCell, fedpara_param_count, fedpara_rank


def reference_lstm(fed: FedParaLSTM) -> nn.LSTM:
    """An nn.LSTM carrying FedParaLSTM's built weights and biases."""
    ref = nn.LSTM(fed.input_size, fed.hidden_size, fed.num_layers, bias=fed.bias, batch_first=fed.batch_first,
                  dtype=torch.float64)  # fmt: skip
    with torch.no_grad():
        for i, cell in enumerate(fed.layers):
            getattr(ref, f"weight_ih_l{i}").copy_(cell.ih.weight)
            getattr(ref, f"weight_hh_l{i}").copy_(cell.hh.weight)
            if fed.bias:
                getattr(ref, f"bias_ih_l{i}").copy_(cell.bias_ih)
                getattr(ref, f"bias_hh_l{i}").copy_(cell.bias_hh)
    return ref


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 7), st.integers(2, 9), st.booleans(), st.booleans(), st.booleans(),
    st.booleans(), st.sampled_from([None, 0.0, 0.5, 1.0]),
)  # fmt: skip
def test_matches_nn_lstm(num_layers, input_size, hidden, batch_first, bias, with_hx, low_rank, gamma):
    kw = {"rank": 1} if gamma is None else {"gamma": gamma}
    fed = FedParaLSTM(input_size, hidden, num_layers, bias=bias, batch_first=batch_first, low_rank=low_rank,
                      dtype=torch.float64, **kw)  # fmt: skip
    ref = reference_lstm(fed)
    L, N = 5, 3
    x = torch.randn((N, L, input_size) if batch_first else (L, N, input_size), dtype=torch.float64)
    hx = None
    if with_hx:
        hx = (torch.randn(num_layers, N, hidden, dtype=torch.float64),
              torch.randn(num_layers, N, hidden, dtype=torch.float64))  # fmt: skip
    out, (h, c) = fed(x, hx)
    out_r, (h_r, c_r) = ref(x, hx)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(h, h_r)
    torch.testing.assert_close(c, c_r)


def test_unbatched_input_matches_nn_lstm():
    fed = FedParaLSTM(4, 6, 2, gamma=0.5, dtype=torch.float64)
    ref = reference_lstm(fed)
    x = torch.randn(7, 4, dtype=torch.float64)
    hx = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    out, (h, c) = fed(x, hx)
    out_r, (h_r, c_r) = ref(x, hx)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(h, h_r)
    torch.testing.assert_close(c, c_r)
    out, (h, c) = fed(x)
    assert out.shape == (7, 6) and h.shape == (2, 6) and c.shape == (2, 6)


def test_cell_matches_nn_lstm_cell():
    cell = FedParaLSTMCell(5, 8, rank=2, dtype=torch.float64)
    ref = nn.LSTMCell(5, 8, dtype=torch.float64)
    with torch.no_grad():
        ref.weight_ih.copy_(cell.ih.weight)
        ref.weight_hh.copy_(cell.hh.weight)
        ref.bias_ih.copy_(cell.bias_ih)
        ref.bias_hh.copy_(cell.bias_hh)
    x, h, c = (torch.randn(3, n, dtype=torch.float64) for n in (5, 8, 8))
    for a, b in zip(cell(x, (h, c)), ref(x, (h, c))):
        torch.testing.assert_close(a, b)
    for a, b in zip(cell(x[0]), ref(x[0])):  # unbatched, zero state
        torch.testing.assert_close(a, b)


def test_gate_matrices_are_fedpara_with_their_own_ranks_and_counts():
    lstm = FedParaLSTM(8, 64, num_layers=2, gamma=0.3)
    r_ih0, r_hh0, r_ih1, r_hh1 = lstm.ranks
    assert r_ih0 == fedpara_rank(256, 8, 0.3)
    assert r_hh0 == r_hh1 == r_ih1 == fedpara_rank(256, 64, 0.3)
    expected = (
        fedpara_param_count(256, 8, r_ih0) + fedpara_param_count(256, 64, r_hh0)
        + fedpara_param_count(256, 64, r_ih1) + fedpara_param_count(256, 64, r_hh1) + 2 * 2 * 256
    )  # fmt: skip
    assert sum(p.numel() for p in lstm.parameters()) == expected
    dense = sum(p.numel() for p in nn.LSTM(8, 64, 2).parameters())
    assert expected < dense


def test_gradients_reach_every_factor_and_dropout_is_train_only():
    lstm = FedParaLSTM(3, 5, num_layers=2, dropout=0.5, batch_first=True, gamma=0.5)
    x = torch.randn(2, 4, 3)
    out, _ = lstm(x)
    out.square().sum().backward()
    for name, p in lstm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    lstm.eval()
    torch.testing.assert_close(lstm(x)[0], lstm(x)[0])


def test_init_matches_nn_lstm_scale():
    torch.manual_seed(0)
    lstm = FedParaLSTM(128, 128, gamma=0.5)
    ratio = lstm.layers[0].hh.weight.std().item() / (1 / 128**0.5 / 3**0.5)
    assert 0.5 < ratio < 2.0


def test_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        FedParaLSTM(3, 0, gamma=0.5)
    with pytest.raises(ValueError, match="dropout"):
        FedParaLSTM(3, 4, dropout=2.0, gamma=0.5)
    with pytest.raises(ValueError, match=r"layers\.0\.ih.*gamma must lie in \[0, 1\]"):
        FedParaLSTM(3, 4, gamma=-1)
    lstm = FedParaLSTM(3, 4, 2, gamma=0.5)
    with pytest.raises(ValueError, match="features"):
        lstm(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match="hx must be"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
