"""GATv2 message passing written with gather/scatter, batched over samples of one graph.

Semantics follow torch_geometric's ``GATv2Conv(heads, concat=True, edge_dim, add_self_loops=True,
fill_value="mean", share_weights=False, bias=True)``; the self-loops are added once per netlist by
:func:`add_self_loops_mean` (hoisted out of the sampling loop) rather than on every call.

For edge ``j -> i`` and head ``h`` (x_l / x_r: source / target linears, e: edge linear)::

    a_ij = att_h . LeakyReLU_0.2(x_l[j] + x_r[i] + e(edge_attr_ji))
    out_i = bias + concat_h sum_j softmax_{j in N(i)}(a_ij) * x_l[j]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def add_self_loops_mean(edge_index: Tensor, edge_attr: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Drop existing self-loops, then add one loop per node whose attribute is the mean of the
    attributes of the node's incoming edges (zero for nodes without incoming edges).

    edge_index [2, E] int64 (source, destination), edge_attr [E, D] -> ([2, E' + V], [E' + V, D]).
    """
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must be [2, E], got {tuple(edge_index.shape)}")
    if edge_attr.shape[0] != edge_index.shape[1]:
        raise ValueError(f"edge_attr has {edge_attr.shape[0]} rows for {edge_index.shape[1]} edges")
    keep = edge_index[0] != edge_index[1]
    edge_index, edge_attr = edge_index[:, keep], edge_attr[keep]
    dst = edge_index[1]
    total = edge_attr.new_zeros(num_nodes, edge_attr.shape[1]).index_add_(0, dst, edge_attr)
    count = edge_attr.new_zeros(num_nodes).index_add_(0, dst, edge_attr.new_ones(dst.shape[0]))
    loop_attr = total / count.clamp(min=1).unsqueeze(1)
    loops = torch.arange(num_nodes, device=edge_index.device).expand(2, num_nodes)
    return torch.cat([edge_index, loops], dim=1), torch.cat([edge_attr, loop_attr], dim=0)


def segment_softmax(scores: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Softmax of scores [B, E, H] over the edges that share a destination index [E]."""
    idx = index.view(1, -1, 1).expand_as(scores)
    shape = (scores.shape[0], num_segments, scores.shape[2])
    peak = scores.new_full(shape, float("-inf")).scatter_reduce(1, idx, scores, "amax", include_self=True)
    exp = (scores - peak.gather(1, idx)).exp()
    denom = scores.new_zeros(shape).index_add_(1, index, exp)
    return exp / (denom.gather(1, idx) + 1e-16)


class GATv2(nn.Module):
    """One GATv2 layer: x [B, V, in_dim] -> [B, V, heads * head_dim] (heads concatenated).

    Parameter names mirror torch_geometric (lin_l, lin_r, lin_edge, att, bias) so weights copy over.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int = 4, edge_dim: int = 4,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"GATv2 width {out_dim} must be divisible by heads={heads}")
        self.heads, self.head_dim, self.negative_slope = heads, out_dim // heads, negative_slope
        self.lin_l = nn.Linear(in_dim, out_dim)
        self.lin_r = nn.Linear(in_dim, out_dim)
        self.lin_edge = nn.Linear(edge_dim, out_dim, bias=False)
        self.att = nn.Parameter(torch.empty(1, heads, self.head_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.att)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        """x [B, V, in_dim]; edge_index [2, E] and edge_attr [E, edge_dim] already hold self-loops
        (see :func:`add_self_loops_mean`)."""
        B, V, _ = x.shape
        H, C = self.heads, self.head_dim
        src, dst = edge_index[0], edge_index[1]
        x_l = self.lin_l(x).view(B, V, H, C)
        x_r = self.lin_r(x).view(B, V, H, C)
        x_j = x_l.index_select(1, src)  # [B, E, H, C]
        z = x_j + x_r.index_select(1, dst) + self.lin_edge(edge_attr).view(1, -1, H, C)
        scores = (F.leaky_relu(z, self.negative_slope) * self.att).sum(-1)  # [B, E, H]
        alpha = segment_softmax(scores, dst, V)
        out = x.new_zeros(B, V, H, C).index_add_(1, dst, x_j * alpha.unsqueeze(-1))
        return out.reshape(B, V, H * C) + self.bias
