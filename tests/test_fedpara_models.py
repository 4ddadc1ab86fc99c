"""VGG16-GN sizes against the paper, and a tiny FedPara model learning scikit-learn digits."""

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fedlowrank.fedpara import FedParaConv2d, FedParaLinear, LowRankConv2d, vgg16, vgg16_with_table
from fedlowrank.fedpara.models import print_size_table
from fedlowrank.fedpara.report import INIT_SHAPES, init_std_table


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These ops are tiny: on a shared 2-core machine extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(m):
    return sum(p.numel() for p in m.parameters())


# exact counts; the paper prints 15.25M, 1.547M, 15.30M, 4.532M
@pytest.mark.parametrize(
    "classes,gamma,exact,paper,digits",
    [(10, None, 15_253_578, 15.25, 2), (10, 0.1, 1_546_844, 1.547, 3),
     (100, None, 15_299_748, 15.30, 2), (100, 0.4, 4_531_856, 4.532, 3)],
)  # fmt: skip
def test_vgg16_gn_sizes_are_the_papers(classes, gamma, exact, paper, digits):
    model = vgg16(classes, gamma)
    n = count(model)
    assert n == exact
    assert round(n / 1e6, digits) == paper


def test_vgg16_structure_behind_the_counts():
    model, table = vgg16_with_table(10, 0.1)
    convs = [m for m in model.modules() if isinstance(m, FedParaConv2d)]
    assert len(convs) == 13 and all(c.bias is not None for c in convs)  # every conv, the first included
    assert [type(m) for m in model.classifier if not isinstance(m, (nn.Dropout, nn.ReLU))] == [nn.Linear] * 3
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 13 and all(g.num_groups == 2 and g.affine for g in gns)
    assert table.total_after == count(model)
    assert convs[0].rank == 3 and convs[-1].rank == 52  # ceil(0.9*2 + 0.1*6), ceil(0.9*23 + 0.1*309)


def test_vgg16_low_rank_has_at_most_fedparas_budget_and_runs():
    fed, low = vgg16(10, 0.1), vgg16(10, 0.1, low_rank=True)
    assert all(isinstance(m, LowRankConv2d) for m in low.features if isinstance(m, (nn.Conv2d, LowRankConv2d)))
    assert 0.99 * count(fed) <= count(low) <= count(fed)
    fed.eval()
    x = torch.randn(2, 3, 32, 32)
    assert fed(x).shape == (2, 10) and low(x).shape == (2, 10)
    with pytest.raises(ValueError, match="low_rank=True needs gamma"):
        vgg16(10, low_rank=True)
    with pytest.raises(ValueError, match="num_classes"):
        vgg16(0)


def test_size_table_prints_the_papers_figures(capsys):
    print_size_table()
    out = capsys.readouterr().out
    assert "| VGG16-GN FedPara | 10 | 0.1 | 1,546,844 | 1.547 | 1.547M |" in out
    assert "| VGG16-GN FedPara | 100 | 0.4 | 4,531,856 | 4.532 | 4.532M |" in out
    assert "| VGG16-GN | 100 | - | 15,299,748 | 15.300 | 15.30M |" in out


def test_init_report_rows():
    rows = init_std_table(seeds=1)
    assert len(rows) == 4 * len(INIT_SHAPES)
    assert all(abs(r["exact"] - 1.0) < 1e-3 and 0.2 < r["draw_mean"] < 5.0 for r in rows)


def test_tiny_fedpara_model_learns_digits():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    torch.manual_seed(0)
    model = nn.Sequential(
        FedParaConv2d(1, 16, 3, padding=1, rank=3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),  # (N, 256)
        FedParaLinear(256, 64, gamma=0.3), nn.ReLU(), FedParaLinear(64, 10, gamma=0.5),
    )  # fmt: skip
    dense = 16 * 9 + 16 + 256 * 64 + 64 + 64 * 10 + 10
    assert count(model) < 0.6 * dense
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), 32):
            idx = perm[i : i + 32]
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(Xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.9, acc  # chance is 0.1
