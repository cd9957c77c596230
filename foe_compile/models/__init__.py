"""Plain-PyTorch reference FoE modules: the semantics kernels, passes and runtimes are tested against."""
from .attention import FoEAttention, GroupAttention
from .layer import ExactDecoderLayer, FoEDecoderLayer
from .moe import FoEDenseMLP, FoEMoE, GroupExperts, Router, SplitMLP

__all__ = [
    "ExactDecoderLayer",
    "FoEAttention",
    "FoEDecoderLayer",
    "FoEDenseMLP",
    "FoEMoE",
    "GroupAttention",
    "GroupExperts",
    "Router",
    "SplitMLP",
]
