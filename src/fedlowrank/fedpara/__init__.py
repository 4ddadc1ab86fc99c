"""FedPara and pFedPara (Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning", ICLR 2022).

Layers whose weight is a Hadamard product of two low-rank factors (Tucker-2 tensors for
convolutions), their personalised form W1 * (W2 + 1), the same-budget low-rank baseline, the
gamma rank rule, whole-model conversion and the paper's VGG16-GN. See docs/fedpara.md.
"""

from .base import FactorisedConv2d, FactorisedLinear, LowRankFactor
from .convert import ConversionTable, LayerRow, fedparaize
from .layers import FedParaConv2d, FedParaLinear
from .lowrank import LowRankConv2d, LowRankLinear
from .lstm import FedParaLSTM, FedParaLSTMCell
from .models import vgg16, vgg16_with_table
from .pfedpara import (
    PFedParaConv2d,
    PFedParaLinear,
    pfedpara_global_keys,
    pfedpara_local_keys,
    split_pfedpara_state,
)
from .rank import (
    dense_param_count,
    fedpara_param_count,
    fedpara_rank,
    lowrank_param_count,
    lowrank_rank,
    rank_bounds,
)

__all__ = [
    "FedParaLinear",
    "FedParaConv2d",
    "FedParaLSTM",
    "FedParaLSTMCell",
    "LowRankLinear",
    "LowRankConv2d",
    "PFedParaLinear",
    "PFedParaConv2d",
    "pfedpara_global_keys",
    "pfedpara_local_keys",
    "split_pfedpara_state",
    "fedpara_rank",
    "lowrank_rank",
    "rank_bounds",
    "dense_param_count",
    "fedpara_param_count",
    "lowrank_param_count",
    "fedparaize",
    "ConversionTable",
    "LayerRow",
    "vgg16",
    "vgg16_with_table",
    "LowRankFactor",
    "FactorisedLinear",
    "FactorisedConv2d",
]
