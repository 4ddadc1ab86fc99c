"""FedPara and low-rank Linear/Conv2d layers: forward against float64 references, nn.Conv2d
parity, parameter counts, the rank R^2 property, gradients and the He-variance init."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from fedlowrank.fedpara import (
    FedParaConv2d,
    FedParaLinear,
    LowRankConv2d,
    LowRankLinear,
    fedpara_param_count,
    fedpara_rank,
    lowrank_param_count,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These ops are tiny: on a shared 2-core machine extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def np_factor(x, y, core=None):
    """X Y^T, or sum_{a,b} T[a,b] * outer(X[:, a], Y[:, b]) built with explicit loops (float64)."""
    x, y = x.detach().double().numpy(), y.detach().double().numpy()
    if core is None:
        out = np.zeros((x.shape[0], y.shape[0]))
        for a in range(x.shape[1]):
            out += np.outer(x[:, a], y[:, a])
        return out
    t = core.detach().double().numpy()
    out = np.zeros((x.shape[0], y.shape[0], *t.shape[2:]))
    for a in range(t.shape[0]):
        for b in range(t.shape[1]):
            out += np.outer(x[:, a], y[:, b])[:, :, None, None] * t[a, b][None, None]
    return out


def np_conv2d(x, w, b, stride, padding, dilation):
    """Direct convolution, zero padding, loops over output positions (float64)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, oh, ow))
    for p in range(oh):
        for q in range(ow):
            patch = xp[:, :, p * sh : p * sh + dh * (kh - 1) + 1 : dh, q * sw : q * sw + dw * (kw - 1) + 1 : dw]
            out[:, :, p, q] = np.einsum("nihw,oihw->no", patch, w)
    return out + (0 if b is None else b[None, :, None, None])


def randomise(layer, seed=0):
    """Replace every parameter by standard-normal draws (the math must hold for any values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


# ---------------------------------------------------------------- float64 references


@pytest.mark.parametrize("nonlinear", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fedpara_linear_matches_hand_built_reference(nonlinear, bias):
    layer = randomise(FedParaLinear(13, 9, rank=3, bias=bias, nonlinear=nonlinear, dtype=torch.float64))
    w1 = np_factor(layer.w1.x, layer.w1.y)
    w2 = np_factor(layer.w2.x, layer.w2.y)
    w = np.tanh(w1) * np.tanh(w2) if nonlinear else w1 * w2
    x = torch.randn(4, 5, 13, dtype=torch.float64)
    ref = x.numpy() @ w.T + (layer.bias.detach().numpy() if bias else 0)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.weight.detach().numpy(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [(3, 1, 1, 1), (3, 2, 0, 1), ((2, 3), (1, 2), (1, 0), (2, 1)), (1, 1, 0, 1), (5, 1, 2, 1)],
)
@pytest.mark.parametrize("nonlinear", [False, True])
def test_fedpara_conv_matches_hand_built_reference(kernel, stride, padding, dilation, nonlinear):
    layer = FedParaConv2d(4, 6, kernel, stride, padding, rank=3, nonlinear=nonlinear, dilation=dilation,
                          dtype=torch.float64)  # fmt: skip
    randomise(layer, seed=1)
    w1 = np_factor(layer.w1.x, layer.w1.y, layer.w1.core)
    w2 = np_factor(layer.w2.x, layer.w2.y, layer.w2.core)
    w = np.tanh(w1) * np.tanh(w2) if nonlinear else w1 * w2
    if w.ndim == 2:
        w = w[:, :, None, None]
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    ref = np_conv2d(x.numpy(), w, layer.bias.detach().numpy(), layer.stride, layer.padding, layer.dilation)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-9, atol=1e-9)


def test_lowrank_layers_match_hand_built_reference():
    lin = randomise(LowRankLinear(11, 7, rank=4, dtype=torch.float64))
    x = torch.randn(3, 11, dtype=torch.float64)
    ref = x.numpy() @ np_factor(lin.w.x, lin.w.y).T + lin.bias.detach().numpy()
    np.testing.assert_allclose(lin(x).detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    conv = randomise(LowRankConv2d(3, 5, 3, padding=1, rank=4, dtype=torch.float64))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = np_factor(conv.w.x, conv.w.y, conv.w.core)
    ref = np_conv2d(x.numpy(), w, conv.bias.detach().numpy(), (1, 1), (1, 1), (1, 1))
    np.testing.assert_allclose(conv(x).detach().numpy(), ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- nn.Conv2d parity


conv_cfg = st.fixed_dictionaries(
    {
        "kernel": st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))),
        "stride": st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))),
        "padding": st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                             st.sampled_from(["same", "valid"])),  # fmt: skip
        "dilation": st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
        "bias": st.booleans(),
        "batched": st.booleans(),
        "cin": st.integers(1, 4),
        "cout": st.integers(1, 5),
    }
)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=120, deadline=None)
@given(conv_cfg, st.integers(6, 10), st.integers(6, 10))
def test_fedpara_conv_behaves_like_nn_conv2d(cfg, h, w):
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], bias=cfg["bias"],
              padding_mode=cfg["padding_mode"], dtype=torch.float64)  # fmt: skip
    try:
        ref = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["kernel"], **kw)
    except ValueError:  # a configuration nn.Conv2d rejects must be rejected by us too
        event("rejected configuration")
        with pytest.raises(ValueError):
            FedParaConv2d(cfg["cin"], cfg["cout"], cfg["kernel"], rank=1, **kw)
        return
    layer = randomise(FedParaConv2d(cfg["cin"], cfg["cout"], cfg["kernel"], rank=1, **kw))
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        if cfg["bias"]:
            ref.bias.copy_(layer.bias)
    x = torch.randn(*([2] if cfg["batched"] else []), cfg["cin"], h, w, dtype=torch.float64)
    try:
        expected = ref(x)
    except RuntimeError:  # input too small for this kernel/padding: both must refuse
        event("rejected input")
        with pytest.raises(RuntimeError):
            layer(x)
        return
    event(f"compared, padding_mode={cfg['padding_mode']}")
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", (2, 1)])
def test_every_padding_mode_matches_nn_conv2d(padding_mode, padding):
    kw = dict(padding=padding, dilation=(1, 2), padding_mode=padding_mode, dtype=torch.float64)
    layer = randomise(FedParaConv2d(3, 4, (3, 2), rank=2, **kw))
    ref = nn.Conv2d(3, 4, (3, 2), **kw)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-10, atol=1e-10)


def test_fedpara_linear_accepts_what_linear_accepts():
    layer = FedParaLinear(6, 4, rank=2)
    for shape in [(6,), (3, 6), (2, 3, 5, 6)]:
        assert layer(torch.randn(shape)).shape == (*shape[:-1], 4)
    assert layer.weight.shape == (4, 6)


# ---------------------------------------------------------------- counts and ranks


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([1, 2, 3, (1, 3)]), st.floats(0, 1),
       st.booleans())  # fmt: skip
def test_parameter_counts(o, i, k, gamma, bias):
    conv = FedParaConv2d(i, o, k, gamma=gamma, bias=bias)
    R = fedpara_rank(o, i, gamma, k)
    assert conv.rank == R
    assert sum(p.numel() for p in conv.parameters()) == fedpara_param_count(o, i, R, k) + (o if bias else 0)
    lin = FedParaLinear(i, o, gamma=gamma, bias=bias)
    assert sum(p.numel() for p in lin.parameters()) == 2 * lin.rank * (o + i) + (o if bias else 0)
    low = LowRankConv2d(i, o, k, gamma=gamma, bias=bias)
    assert sum(p.numel() for p in low.parameters()) == lowrank_param_count(o, i, low.rank, k) + (o if bias else 0)


def test_conv_tucker_count_is_the_papers():
    conv = FedParaConv2d(256, 256, 3, rank=36, bias=False)
    assert sum(p.numel() for p in conv.parameters()) == 2 * (36**2 * 9 + 36 * 512) == 60192


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 20), st.integers(0, 20), st.integers(0, 10**6))
def test_fedpara_reaches_rank_r_squared_and_lowrank_stays_at_2r(R, dm, dn, seed):
    m, n = R * R + dm, R * R + dn  # R^2 <= min(m, n)
    fed = randomise(FedParaLinear(n, m, rank=R, dtype=torch.float64), seed)
    assert torch.linalg.matrix_rank(fed.weight.detach()).item() == R * R
    if 2 * R <= min(m, n):
        low = randomise(LowRankLinear(n, m, rank=2 * R, dtype=torch.float64), seed)
        assert sum(p.numel() for p in low.parameters()) == sum(p.numel() for p in fed.parameters())
        assert torch.linalg.matrix_rank(low.weight.detach()).item() == 2 * R  # < R^2 once R >= 3


def test_fedpara_rank_is_capped_by_the_matrix_size():
    fed = randomise(FedParaLinear(40, 12, rank=5, dtype=torch.float64))  # R^2 = 25 > 12
    assert torch.linalg.matrix_rank(fed.weight.detach()).item() == 12


def test_fedpara_conv_unfoldings_reach_r_squared():
    conv = randomise(FedParaConv2d(20, 30, 3, rank=4, dtype=torch.float64))  # R^2 = 16 <= 20, 30
    w = conv.weight.detach()  # (30, 20, 3, 3)
    assert torch.linalg.matrix_rank(w.reshape(30, -1)).item() == 16
    assert torch.linalg.matrix_rank(w.transpose(0, 1).reshape(20, -1)).item() == 16


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "layer,x",
    [
        (FedParaLinear(8, 5, rank=2), torch.randn(3, 8)),
        (FedParaLinear(8, 5, rank=2, nonlinear=True), torch.randn(3, 8)),
        (FedParaConv2d(3, 4, 3, padding=1, rank=2), torch.randn(2, 3, 5, 5)),
        (FedParaConv2d(3, 4, 1, rank=2), torch.randn(2, 3, 5, 5)),
        (LowRankLinear(8, 5, rank=2), torch.randn(3, 8)),
        (LowRankConv2d(3, 4, 3, rank=2), torch.randn(2, 3, 5, 5)),
    ],
    ids=["fedpara-linear", "fedpara-linear-tanh", "fedpara-conv", "fedpara-conv1x1", "lowrank-linear",
         "lowrank-conv"],  # fmt: skip
)
def test_gradients_reach_every_factor(layer, x):
    names = [n for n, _ in layer.named_parameters()]
    assert {"w1.x", "w1.y", "w2.x", "w2.y"} <= set(names) or {"w.x", "w.y"} <= set(names)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_match_finite_differences():
    layer = FedParaConv2d(2, 3, 3, padding=1, rank=2, dtype=torch.float64)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    params = tuple(layer.parameters())

    def f(*ps):
        w1 = torch.einsum("abhw,oa,ib->oihw", ps[3], ps[1], ps[2])
        w2 = torch.einsum("abhw,oa,ib->oihw", ps[6], ps[4], ps[5])
        return F.conv2d(x, w1 * w2, ps[0], padding=1)

    assert [n for n, _ in layer.named_parameters()] == ["bias", "w1.x", "w1.y", "w1.core", "w2.x", "w2.y", "w2.core"]
    torch.testing.assert_close(f(*params), layer(x))
    assert torch.autograd.gradcheck(lambda *ps: f(*ps).sum(), params)


# ---------------------------------------------------------------- initialisation


INIT_SHAPES = [  # (in, out, kernel)
    (3, 64, 3), (64, 128, 3), (256, 256, 3), (512, 512, 3), (16, 32, 5), (64, 32, 1),
    (784, 200, None), (256, 256, None), (64, 10, None),
]  # fmt: skip
VARIANTS = [
    (FedParaLinear, FedParaConv2d, {}),
    (FedParaLinear, FedParaConv2d, {"nonlinear": True}),
    (LowRankLinear, LowRankConv2d, {}),
]


def built_std_ratio(layer) -> float:
    fan_in = layer.weight[0].numel()
    return layer.weight.detach().std().item() / math.sqrt(2.0 / fan_in)


def make(cls_lin, cls_conv, i, o, k, **kw):
    return cls_lin(i, o, **kw) if k is None else cls_conv(i, o, k, **kw)


@pytest.mark.parametrize("i,o,k", INIT_SHAPES)
@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_built_weight_has_he_std(i, o, k, gamma):
    torch.manual_seed(0)
    for lin, conv, kw in VARIANTS:
        ratio = built_std_ratio(make(lin, conv, i, o, k, gamma=gamma, **kw))
        assert 0.5 < ratio < 2.0, (lin, kw, ratio)  # the spec
        assert abs(ratio - 1.0) < 1e-3, (lin, kw, ratio)  # what the rescale delivers


@pytest.mark.parametrize("i,o,k", [s for s in INIT_SHAPES if s[0] * s[1] >= 8192])
def test_analytic_draw_alone_is_within_a_factor_two_of_he(i, o, k):
    for seed in range(3):
        torch.manual_seed(seed)
        for lin, conv, kw in VARIANTS:
            layer = make(lin, conv, i, o, k, gamma=0.1, **kw)
            layer.reset_parameters(exact_std=False)
            assert 0.5 < built_std_ratio(layer) < 2.0, (lin, kw, seed)


@pytest.mark.parametrize("lin,conv,kw", VARIANTS[::2])  # plain forms: the expectation is exact
def test_analytic_draw_has_he_variance_in_expectation(lin, conv, kw):
    var_ratios = []
    for seed in range(30):
        torch.manual_seed(seed)
        layer = conv(32, 32, 3, gamma=0.2, **kw)
        layer.reset_parameters(exact_std=False)
        var_ratios.append(built_std_ratio(layer) ** 2)
    assert 0.85 < float(np.mean(var_ratios)) < 1.15


def test_rescale_scales_every_factor_tensor_by_one_constant():
    layer = FedParaConv2d(3, 64, 3, gamma=0.1)  # a small layer: the draw alone is often far off
    torch.manual_seed(3)
    layer.reset_parameters(exact_std=False)
    raw = {n: p.detach().clone() for n, p in layer.named_parameters() if n != "bias"}
    torch.manual_seed(3)
    layer.reset_parameters()
    c = {n: (p.detach() / raw[n]).mean().item() for n, p in layer.named_parameters() if n != "bias"}
    for n, p in layer.named_parameters():
        if n != "bias":
            torch.testing.assert_close(p.detach(), c["w1.x"] * raw[n])
    assert abs(c["w1.x"] - 1.0) > 0.01  # it did move this draw
    assert abs(built_std_ratio(layer) - 1.0) < 1e-4


def test_fan_in_he_on_factors_would_be_far_too_small():
    # what the paper's notebook does (He fan-in on each stored tensor) is ~60x below He at 256->256
    layer = FedParaConv2d(256, 256, 3, rank=36, bias=False)
    with torch.no_grad():
        for f in (layer.w1, layer.w2):
            nn.init.normal_(f.core, 0, math.sqrt(2 / (36 * 9)))
            nn.init.normal_(f.x, 0, math.sqrt(2 / 256))
            nn.init.normal_(f.y, 0, math.sqrt(2 / 256))
    assert built_std_ratio(layer) < 1 / 30
    layer.reset_parameters()
    assert 0.5 < built_std_ratio(layer) < 2.0


# ---------------------------------------------------------------- errors and plumbing


def test_errors_name_the_layer_and_argument():
    with pytest.raises(ValueError, match=r"FedParaConv2d\(3, 8, kernel_size=3\).*gamma must lie in \[0, 1\]"):
        FedParaConv2d(3, 8, 3, gamma=1.2)
    with pytest.raises(ValueError, match=r"layer 'enc\.fc'.*rank must be an int in \[1, 4\]"):
        FedParaLinear(4, 16, rank=5, name="enc.fc")
    with pytest.raises(ValueError, match="groups must be 1"):
        FedParaConv2d(4, 4, 3, rank=2, groups=2)
    with pytest.raises(ValueError, match="padding='same'"):
        FedParaConv2d(4, 4, 3, stride=2, padding="same", rank=2)
    with pytest.raises(ValueError, match="padding_mode"):
        FedParaConv2d(4, 4, 3, rank=2, padding_mode="mirror")
    with pytest.raises(ValueError, match="give rank= or gamma="):
        FedParaLinear(4, 4)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        LowRankLinear(0, 4, rank=1)


def test_dtype_and_state_dict_round_trip():
    a = FedParaConv2d(3, 8, 3, padding=1, gamma=0.3, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    b = FedParaConv2d(3, 8, 3, padding=1, gamma=0.3, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    assert "weight" not in a.state_dict()  # the weight is built, never stored
