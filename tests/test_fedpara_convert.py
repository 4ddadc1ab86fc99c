"""fedparaize: replacing the layers of arbitrary models, and the per-layer table."""

import pytest
import torch
from torch import nn

from fedlowrank.fedpara import (
    FedParaConv2d,
    FedParaLinear,
    FedParaLSTM,
    LowRankConv2d,
    LowRankLinear,
    PFedParaConv2d,
    PFedParaLinear,
    fedpara_rank,
    fedparaize,
    pfedpara_local_keys,
)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(2, 16), nn.ReLU())
        self.down = nn.Conv2d(16, 32, (3, 1), stride=(2, 1), padding=(1, 0), bias=False)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 24, 1)
        self.rnn = nn.LSTM(24, 20, num_layers=2, batch_first=True)
        self.birnn = nn.LSTM(20, 8, bidirectional=True)
        self.emb = nn.Embedding(10, 20)
        self.head = nn.Sequential(nn.Linear(36, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, x, tok):  # x (N, 3, 8, 8), tok (N,)
        f = self.pw(self.depthwise(self.down(self.stem(x))))  # (N, 24, 4, 8)
        seq = f.mean(2).transpose(1, 2)  # (N, 8, 24)
        out, _ = self.rnn(seq)  # (N, 8, 20)
        out = out + self.emb(tok)[:, None]
        out2, _ = self.birnn(out.transpose(0, 1))  # (8, N, 16)
        return self.head(torch.cat([out[:, -1], out2[-1]], dim=1))


def count(m):
    return sum(p.numel() for p in m.parameters())


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([1, 7])


def test_mixed_model_keeps_shapes_and_table_sums():
    torch.manual_seed(0)
    model = Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, table = fedparaize(model, 0.3)
    assert new(*inputs()).shape == model(*inputs()).shape == (2, 5)
    assert table.total_after == count(new)
    assert table.total_before == count(model)
    assert table.total_after < table.total_before
    # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    types = {r.name: r.new_layer for r in table.rows}
    assert types["stem.0"] == "FedParaConv2d" and types["down"] == "FedParaConv2d" and types["pw"] == "FedParaConv2d"
    assert types["rnn"] == "FedParaLSTM" and types["head.0"] == types["head.2"] == "FedParaLinear"
    assert types["depthwise"] == "Conv2d" and types["birnn"] == "LSTM" and types["emb"] == "Embedding"
    assert types["stem.1"] == "GroupNorm"
    notes = {r.name: r.note for r in table.rows}
    assert "grouped" in notes["depthwise"] and "bidirectional" in notes["birnn"]
    assert isinstance(new.down, FedParaConv2d) and new.down.bias is None
    assert new.down.stride == (2, 1) and new.down.padding == (1, 0) and new.down.kernel_size == (3, 1)
    assert isinstance(new.rnn, FedParaLSTM) and new.rnn.batch_first and new.rnn.num_layers == 2


def test_table_ranks_follow_the_rule_and_render():
    new, table = fedparaize(Mixed(), 0.3)
    row = next(r for r in table.rows if r.name == "stem.0")
    assert row.ranks == (fedpara_rank(16, 3, 0.3, 3),) == (new.stem[0].rank,)
    assert row.params_before == 16 * 3 * 9 + 16 and row.params_after == count(new.stem[0])
    rnn = next(r for r in table.rows if r.name == "rnn")
    assert rnn.ranks == new.rnn.ranks and len(rnn.ranks) == 4
    md = table.to_markdown()
    assert "| stem.0 | Conv2d | FedParaConv2d | 16x3x3x3 |" in md and "**total**" in md
    assert f"{table.total_after:,}" in str(table)


def test_forward_and_backward_after_conversion():
    new, _ = fedparaize(Mixed(), 0.5)
    new(*inputs()).square().sum().backward()
    grads = [p.grad for n, p in new.named_parameters() if "w1." in n or "w2." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_include_and_exclude_by_type_and_glob():
    _, t = fedparaize(Mixed(), 0.3, include=[nn.Conv2d])
    assert {r.name for r in t.replaced} == {"stem.0", "down", "pw"}
    _, t = fedparaize(Mixed(), 0.3, include=["head.*", "stem.0"])
    assert {r.name for r in t.replaced} == {"stem.0", "head.0", "head.2"}
    _, t = fedparaize(Mixed(), 0.3, exclude=["head.2", nn.LSTM])
    assert {r.name for r in t.replaced} == {"stem.0", "down", "pw", "head.0"}
    with pytest.raises(ValueError, match="include/exclude"):
        fedparaize(Mixed(), 0.3, include=[3])


def test_other_kinds():
    new, t = fedparaize(Mixed(), 0.3, kind="lowrank")
    assert isinstance(new.stem[0], LowRankConv2d) and isinstance(new.head[0], LowRankLinear)
    assert new.rnn.layers[0].low_rank and new(*inputs()).shape == (2, 5)
    assert t.total_after == count(new)
    new, t = fedparaize(Mixed(), 0.3, kind="pfedpara", local_bias=True)
    assert isinstance(new.stem[0], PFedParaConv2d) and isinstance(new.head[2], PFedParaLinear)
    assert type(new.rnn) is nn.LSTM and "pFedPara" in next(r.note for r in t.rows if r.name == "rnn")
    assert "head.2.bias" in pfedpara_local_keys(new) and new(*inputs()).shape == (2, 5)


def test_explicit_rank_nonlinear_inplace_and_errors():
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3))
    same, t = fedparaize(model, rank=2, nonlinear=True, inplace=True)
    assert same is model and isinstance(model[0], FedParaLinear) and model[0].nonlinear
    assert [r.ranks for r in t.replaced] == [(2,), (2,)]
    with pytest.raises(ValueError, match="gamma= .*or rank="):
        fedparaize(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="kind"):
        fedparaize(nn.Linear(3, 3), 0.5, kind="loha")
    with pytest.raises(ValueError, match=r"layer '0'.*rank must be an int in \[1, 10\]"):
        fedparaize(nn.Sequential(nn.Linear(10, 12)), rank=11)


def test_a_bare_layer_and_shared_modules():
    new, t = fedparaize(nn.Conv2d(4, 8, 3), 0.5)
    assert isinstance(new, FedParaConv2d) and t.total_after == count(new)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    new, t = fedparaize(model, 0.5)
    assert new[0] is new[2] and isinstance(new[0], FedParaLinear)
    assert t.total_before == count(model) and t.total_after == count(new)


def test_device_and_dtype_follow_the_original():
    model = nn.Sequential(nn.Linear(5, 7).double(), nn.Conv2d(1, 2, 3).double())
    new, _ = fedparaize(model, 0.5)
    assert all(p.dtype == torch.float64 for p in new.parameters())
