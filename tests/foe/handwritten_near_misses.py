"""Near misses of the forms in handwritten_moes: blocks that compute something foe:: ops do not and must
be left as written, with a reason (REFUSED: (class, a fragment of the reason the report gives)).

Most override one hook of handwritten_moes.WhereIndexAdd or SortSplit rather than spelling out the loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from handwritten_moes import GeluGLU, SortSplit, WhereIndexAdd, with_experts
from handwritten_routers import DenseWeightedInput
from torch import nn
from user_models import SwiGLU


class OffsetAccumulator(WhereIndexAdd):
    """The per-expert loop accumulates into a scaled copy of the input, not into zeros."""

    def accumulator(self, h):
        return h * 0.01


class ScaledIndexAdd(WhereIndexAdd):
    """index_add_ with alpha != 1 scales every expert's contribution."""

    def combine(self, out, token, y, h):
        out.index_add_(0, token, y, alpha=1.01)
        return out


class ScaledGLU(SwiGLU):
    """A learned per-channel scale inside the unit."""

    def __init__(self, d, inner):
        super().__init__(d, inner)
        self.scale = nn.Parameter(torch.rand(inner) + 0.5)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x) * self.scale)


ScaledUnit = with_experts(WhereIndexAdd, ScaledGLU, "ScaledUnit")


class TanhGLU(SwiGLU):
    def forward(self, x):
        return self.w2(torch.tanh(self.w1(x)) * self.w3(x))


TanhGated = with_experts(WhereIndexAdd, TanhGLU, "TanhGated")


class MixedUnits(WhereIndexAdd):
    """Expert 0 is GELU-gated, the others SiLU-gated: one op call cannot compute both."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        self.experts[0] = GeluGLU(d, inner)


class WeightsOnInput(WhereIndexAdd):
    """Llama 4's spelling: the routing weight scales the expert's input, not its output."""

    def contribution(self, e, expert, h, w, token, slot):
        return expert(h[token] * self.factor(w, token, slot, h))


class DenseZeroFill(DenseWeightedInput):
    """The picks scattered into zeros before the sigmoid: every expert not picked gets weight 1/2."""

    fill = 0.0


class DenseBiasedExperts(DenseWeightedInput):
    """A gate_up bias: an expert given the input 0 outputs down(unit(bias)) != 0."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        self.gate_up_bias = nn.Parameter(torch.randn(num_experts, 1, 2 * inner) * 0.1)

    def project(self, routed):
        gate, up = (torch.bmm(routed, self.gate_up) + self.gate_up_bias).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down)


# Expert computations foe::experts_swiglu does not express.
class SortSplitReversedCounts(SortSplit):
    """Chunk sizes in reverse expert order: chunk e holds other experts' rows."""

    def counts(self, flat):
        return F.one_hot(flat, self.num_experts).sum(0).flip(0).tolist()


class SortSplitUnsortedWeights(SortSplit):
    """The weights taken in pick order instead of the sorted order."""

    def factor(self, w, order, h):
        return w.flatten()[:, None]


class FirstSlotWeights(WhereIndexAdd):
    """Every pick weighted by its token's first routing weight (w[token, 0], not w[token, slot])."""

    def factor(self, w, token, slot, h):
        return w[token, 0, None]


class SwappedColumns(WhereIndexAdd):
    """where(ids == e) read as (slot, token): the columns swapped."""

    def picks(self, ids, e):
        slot, token = torch.where(ids == e)
        return token, slot

    def factor(self, w, token, slot, h):
        return w[slot, token, None]


class PrunedThroughView(WhereIndexAdd):
    """Renormalised weights below `threshold` zeroed in place through a view, after which the weights are read."""

    threshold = 0.3

    def route(self, x):
        w, ids = super().route(x)
        w.view(-1).masked_fill_(w.view(-1) < self.threshold, 0)
        return w, ids


REFUSED = [
    (PrunedThroughView, "in place"),
    (FirstSlotWeights, "not multiplied by the routing weights at its picks"),
    (SwappedColumns, "combined into rows other than its tokens'"),
    (SortSplitReversedCounts, "split sizes are not the per-expert pick counts in expert order"),
    (SortSplitUnsortedWeights, "not the routing weights gathered in the sorted order"),
    (WeightsOnInput, "without being multiplied by their routing weights"),
    (ScaledUnit, "besides the projection"),
    (TanhGated, "matches none of foe::experts_swiglu's units"),
    (MixedUnits, "different units"),
    (OffsetAccumulator, "not into zeros"),
    (ScaledIndexAdd, "alpha=1.01"),
    (DenseZeroFill, "(not exactly 0) for the experts not picked"),
    (DenseBiasedExperts, "besides the projection"),
]
