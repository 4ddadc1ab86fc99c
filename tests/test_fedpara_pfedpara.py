"""pFedPara layers W = W1 * (W2 + 1) and the global/local split of a model's state dict."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.fedpara import (
    FedParaLinear,
    PFedParaConv2d,
    PFedParaLinear,
    pfedpara_global_keys,
    pfedpara_local_keys,
    split_pfedpara_state,
)


def randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def test_linear_matches_float64_reference():
    layer = randomise(PFedParaLinear(10, 6, rank=3, dtype=torch.float64))
    w1 = layer.w1.x @ layer.w1.y.T  # (6, 10)
    w2 = layer.w2.x @ layer.w2.y.T
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (w1 * w2 + w1).T + layer.bias)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_conv_matches_float64_reference(nonlinear):
    layer = randomise(PFedParaConv2d(3, 5, 3, padding=1, rank=2, nonlinear=nonlinear, dtype=torch.float64))
    f = torch.tanh if nonlinear else (lambda t: t)
    w1 = f(torch.einsum("abhw,oa,ib->oihw", layer.w1.core, layer.w1.x, layer.w1.y))
    w2 = f(torch.einsum("abhw,oa,ib->oihw", layer.w2.core, layer.w2.x, layer.w2.y))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.conv2d(x, w1 * (w2 + 1), layer.bias, padding=1))


def test_zero_local_factor_reduces_to_the_global_weight():
    layer = randomise(PFedParaLinear(8, 4, rank=2, dtype=torch.float64))
    with torch.no_grad():
        layer.w2.y.zero_()
    torch.testing.assert_close(layer.weight, layer.w1.x @ layer.w1.y.T)


def test_gradients_reach_global_and_local_factors():
    for layer, x in [(PFedParaLinear(8, 4, rank=2), torch.randn(3, 8)),
                     (PFedParaConv2d(2, 3, 3, rank=2), torch.randn(1, 2, 5, 5))]:  # fmt: skip
        layer(x).square().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shape", [(784, 200, None), (256, 256, None), (64, 128, 3), (3, 64, 3)])
def test_built_weight_has_about_he_std(shape):
    torch.manual_seed(0)
    i, o, k = shape
    layer = PFedParaLinear(i, o, gamma=0.5) if k is None else PFedParaConv2d(i, o, k, gamma=0.5)
    ratio = layer.weight.std().item() / math.sqrt(2 / layer.weight[0].numel())
    assert 0.5 < ratio < 2.0


class Net(nn.Module):
    def __init__(self, local_bias=False):
        super().__init__()
        self.conv = PFedParaConv2d(1, 4, 3, rank=2, local_bias=local_bias)
        self.norm = nn.BatchNorm2d(4)
        self.fc = PFedParaLinear(4, 3, rank=2, local_bias=local_bias)
        self.head = nn.Linear(3, 2)
        self.plain = FedParaLinear(2, 2, rank=1)

    def forward(self, x):
        x = self.norm(self.conv(x)).mean((2, 3))
        return self.plain(self.head(self.fc(x)))


def test_global_and_local_keys_partition_the_state_dict():
    net = Net()
    local = pfedpara_local_keys(net)
    glob = pfedpara_global_keys(net)
    assert local == ["conv.w2.x", "conv.w2.y", "conv.w2.core", "fc.w2.x", "fc.w2.y"]
    assert set(local).isdisjoint(glob)
    assert sorted(local + glob) == sorted(net.state_dict())
    assert {"conv.w1.x", "conv.w1.y", "conv.w1.core", "conv.bias", "fc.w1.x", "fc.w1.y", "fc.bias",
            "norm.running_mean", "norm.num_batches_tracked", "head.weight", "plain.w2.x"} <= set(glob)  # fmt: skip
    # state-dict order is kept
    order = list(net.state_dict())
    assert glob == [k for k in order if k in set(glob)]


def test_local_bias_moves_biases_to_the_client():
    net = Net(local_bias=True)
    local = pfedpara_local_keys(net)
    assert "conv.bias" in local and "fc.bias" in local
    assert "conv.bias" not in pfedpara_global_keys(net)
    assert "head.bias" in pfedpara_global_keys(net)  # an ordinary layer stays global
    assert "local_bias=True" in repr(net.fc)


def test_keys_carry_the_full_path_in_nested_models():
    outer = nn.Sequential(nn.Sequential(PFedParaLinear(3, 3, rank=1)), PFedParaLinear(3, 2, rank=1, bias=False))
    assert pfedpara_local_keys(outer) == ["0.0.w2.x", "0.0.w2.y", "1.w2.x", "1.w2.y"]
    assert pfedpara_global_keys(outer) == ["0.0.bias", "0.0.w1.x", "0.0.w1.y", "1.w1.x", "1.w1.y"]


def test_split_state_and_round_trip_keeps_local_part():
    client, server = Net(), Net()
    glob, local = split_pfedpara_state(server)
    assert set(glob) == set(pfedpara_global_keys(server)) and set(local) == set(pfedpara_local_keys(server))
    before = {k: v.clone() for k, v in client.state_dict().items()}
    client.load_state_dict(glob, strict=False)  # a broadcast carries only the global part
    after = client.state_dict()
    for k in pfedpara_local_keys(client):
        torch.testing.assert_close(after[k], before[k])
    for k in glob:
        torch.testing.assert_close(after[k], server.state_dict()[k])
    with pytest.raises(ValueError, match="lacks keys"):
        split_pfedpara_state(server, glob)
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        split_pfedpara_state(server, {**server.state_dict(), "extra": torch.zeros(1)})
