"""MoE blocks written by hand in the ways people write them, for the FX path's matchers.

Each class is plain PyTorch, independent of foe_compile: the eager module is the reference the
converted graph is compared with. SUPPORTED compute sum_k w_k * expert_{e_k}(x) with SwiGLU
experts written in several ways (selection loops, dense masks, matmul on stacked or flat weight
matrices, sort + split), and SUPPORTED_UNITS with the other units foe::experts_swiglu
computes (GELU, a hand-spelled SiLU, ReLU², gpt-oss's clamped GLU with biases and interleaved
columns); all must be rewritten. GRAPH_ROUTED route in ways the fused routing op does not (the
routing stays as written; Llama 4's dense experts weighting their input among them). REFUSED compute
something else (weights applied to the input of experts chosen per token, a unit reading a learned
scale, an activation the op lacks, experts with different units, dense experts whose unpicked
weights are not 0 or whose expert is not 0 at 0) and must be left as written, with a reason.
All take (d, inner, num_experts, top_k) like user_models.DenseLoopMoE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from user_models import DenseLoopMoE, IndexAddLoopMoE, SwiGLU


class _Base(nn.Module):
    def __init__(self, d: int, inner: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, inner) for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])


class WhereIndexAdd(_Base):
    """token, slot = torch.where(ids == e); out.index_add_(0, token, y).

    The per-expert loop of every selection-loop form; a variant overrides one hook: `accumulator`
    (what the loop adds into), `units` ((e, expert) pairs), `picks` (the (token, slot) pairs of expert e), `factor` (the weight
    of each pick), `contribution` (expert e's weighted output) or `combine` (how it is added)."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = self.accumulator(h)
        for e, expert in self.units():
            token, slot = self.picks(ids, e)
            out = self.combine(out, token, self.contribution(e, expert, h, w, token, slot), h)
        return out.view_as(x)

    def units(self):
        return enumerate(self.experts)

    def accumulator(self, h):
        return torch.zeros_like(h)

    def picks(self, ids, e):
        return torch.where(ids == e)

    def factor(self, w, token, slot, h):
        return w[token, slot, None]

    def contribution(self, e, expert, h, w, token, slot):
        return expert(h[token]) * self.factor(w, token, slot, h)

    def combine(self, out, token, y, h):
        out.index_add_(0, token, y)
        return out


class NonzeroIndexAdd(_Base):
    """(ids == e).nonzero() columns as (token, slot); functional index_add."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = h.new_zeros(h.shape)
        for e in range(self.num_experts):
            hits = (ids == e).nonzero()
            token, slot = hits[:, 0], hits[:, 1]
            out = out.index_add(0, token, self.experts[e](h[token]) * w[token, slot].unsqueeze(-1))
        return out.view_as(x)


class WhereScatterAdd(WhereIndexAdd):
    """Combine with scatter_add_ over token indices expanded to [n, d]."""

    def combine(self, out, token, y, h):
        out.scatter_add_(0, token[:, None].expand(-1, h.shape[-1]), y)
        return out


class WhereIndexPut(WhereIndexAdd):
    """Combine with index_put_(..., accumulate=True) (what `out[token] += y` does not do)."""

    def combine(self, out, token, y, h):
        out.index_put_((token,), y, accumulate=True)
        return out


class TopkThenSoftmax(WhereIndexAdd):
    """Mixtral's router spelling: top-k on the logits, softmax over the k picks."""

    def route(self, x):
        logits, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        return F.softmax(logits, dim=-1), ids


class UnnormalisedWhere(WhereIndexAdd):
    """No renormalisation of the top-k probabilities (OLMoE's default)."""

    def route(self, x):
        return torch.topk(self.router(x).softmax(-1), self.top_k, dim=-1)

    def contribution(self, e, expert, h, w, token, slot):
        return self.factor(w, token, slot, h) * expert(h[token])


class StackedMatmul(WhereIndexAdd):
    """Stacked expert weights stored [in, out] and applied with @ on the gathered tokens:
    h[token] @ w_in[e] -> chunk -> silu(g) * u -> @ w_out[e]."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        del self.experts
        self.w_in = nn.Parameter(torch.randn(num_experts, d, 2 * inner) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, inner, d) / inner ** 0.5)

    def units(self):
        return ((e, None) for e in range(self.num_experts))

    def contribution(self, e, expert, h, w, token, slot):
        gate, up = (h[token] @ self.w_in[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out[e] * self.factor(w, token, slot, h)


class FlatMatmulTransposed(WhereIndexAdd):
    """DBRX's layout: every expert's rows in one flat [E * inner, d] matrix per projection, viewed
    per expert; gate and up read through .T, down directly."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        del self.experts
        self.inner = inner
        self.w1, self.v1, self.w2 = (nn.Parameter(torch.randn(num_experts * inner, d) / d ** 0.5) for _ in range(3))

    def units(self):
        return ((e, None) for e in range(self.num_experts))

    def contribution(self, e, expert, h, w, token, slot):
        w1, v1, w2 = (p.view(self.num_experts, self.inner, -1)[e] for p in (self.w1, self.v1, self.w2))
        y = (F.silu(h[token].matmul(w1.T)) * h[token].matmul(v1.T)).matmul(w2)
        return y * self.factor(w, token, slot, h)


class SortSplit(_Base):
    """Sort the picks by expert, split the gathered tokens by per-expert counts (tolist), run each
    expert on its chunk, concatenate, weight by the sorted weights and index_add_ back.

    Variants override `counts` (the split sizes), `factor` (the weights of the sorted picks) or
    `combine` (how the weighted rows are added back)."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        flat = ids.flatten()
        order = flat.argsort()
        token = order // self.top_k
        counts = self.counts(flat)
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, h[token].split(counts))])
        return self.combine(torch.zeros_like(h), token, y * self.factor(w, order, h)).view_as(x)

    def counts(self, flat):
        return F.one_hot(flat, self.num_experts).sum(0).tolist()

    def factor(self, w, order, h):
        return w.flatten()[order, None]

    def combine(self, out, token, y):
        return out.index_add_(0, token, y)


class ParallelExperts(_Base):
    """JetMoE's layout: stable sort, counts by a scatter of ones, one gate_up GEMM per chunk of a
    stacked [E, 2I, d] weight, the unit across all rows at once, split again for the down GEMMs."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        del self.experts
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * inner, d) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, d, inner) / inner ** 0.5)

    def counts(self, h, w, ids):
        return torch.zeros(h.shape[0], self.num_experts, dtype=w.dtype).scatter(1, ids, 1).long().sum(0).tolist()

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        counts = self.counts(h, w, ids)
        _, order = ids.flatten().sort(stable=True, dim=0)
        token = order.div(self.top_k, rounding_mode="trunc")
        chunks = h[token].split(counts, dim=0)
        gate_up = torch.cat([F.linear(c, self.w_in[e]) for e, c in enumerate(chunks)])
        gate, up = gate_up.chunk(2, dim=-1)
        a = (F.silu(gate) * up).split(counts, dim=0)
        y = torch.cat([F.linear(c, self.w_out[e]) for e, c in enumerate(a)]) * w.flatten()[order][:, None]
        return torch.zeros_like(h).index_add(0, token, y).view_as(x)


class PermuteUnpermute(_Base):
    """Permute / unpermute: picks sorted by expert, tokens gathered with index_select, counts by
    histc, one GEMM per chunk of a stacked [E, d, 2I] weight (stored [in, out]), the picks put
    back in token-major order with index_copy_, then weighted and summed over the k slots."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        del self.experts
        self.w_in = nn.Parameter(torch.randn(num_experts, d, 2 * inner) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, inner, d) / inner ** 0.5)

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        E, k = self.num_experts, self.top_k
        counts = torch.histc(ids.flatten().float(), bins=E, min=0, max=E - 1).long().tolist()
        order = torch.argsort(ids.view(-1))
        rows = h.index_select(0, order // k).split(counts)
        gate, up = torch.cat([r @ self.w_in[e] for e, r in enumerate(rows)]).chunk(2, dim=-1)
        y = torch.cat([a @ self.w_out[e] for e, a in enumerate((F.silu(gate) * up).split(counts))])
        picks = torch.zeros(h.shape[0] * k, h.shape[1], dtype=y.dtype).index_copy_(0, order, y)
        return (picks.view(-1, k, h.shape[1]) * w.unsqueeze(-1)).sum(dim=1).view_as(x)


SUPPORTED = [DenseLoopMoE, IndexAddLoopMoE, WhereIndexAdd, NonzeroIndexAdd, WhereScatterAdd, WhereIndexPut,
             TopkThenSoftmax, UnnormalisedWhere, StackedMatmul, FlatMatmulTransposed, SortSplit, ParallelExperts,
             PermuteUnpermute]

# ---- other expert units foe::experts_swiglu computes --------------------------------------------

class GeluGLU(SwiGLU):
    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


def with_experts(form: type, expert, name: str) -> type:
    """The loop spelling `form` with its experts made by `expert(d, inner)` instead of SwiGLU."""
    def __init__(self, d, inner, num_experts, top_k):
        form.__init__(self, d, inner, num_experts, top_k)
        self.experts = nn.ModuleList(expert(d, inner) for _ in range(num_experts))

    return type(name, (form,), {"__init__": __init__, "__module__": __name__})


GeluGated = with_experts(WhereIndexAdd, GeluGLU, "GeluGated")


class BiasedExperts(WhereIndexAdd):
    """Biases on all three projections of a SwiGLU."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        for expert in self.experts:
            expert.w1, expert.w3, expert.w2 = (nn.Linear(a, b, bias=True) for a, b in ((d, inner), (d, inner), (inner, d)))


class HandSpelledSiLU(SwiGLU):
    """silu written out, up first: u * (g * sigmoid(g))."""

    def forward(self, x):
        g = self.w1(x)
        return self.w2(self.w3(x) * (g * torch.sigmoid(g)))


HandSpelledSiLUExperts = with_experts(DenseLoopMoE, HandSpelledSiLU, "HandSpelledSiLUExperts")


class Relu2(nn.Module):
    """Ungated: down(relu(up(x))^2) (Nemotron-H's experts)."""

    def __init__(self, d, inner):
        super().__init__()
        self.up, self.down = nn.Linear(d, inner, bias=False), nn.Linear(inner, d, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) ** 2)


Relu2Experts = with_experts(WhereIndexAdd, Relu2, "Relu2Experts")


class ClampedGLU(nn.Module):
    """gpt-oss's expert in nn.Linear form: one biased gate_up projection with gate and up columns
    interleaved, gate clamped above, up clamped both ways, g * sigmoid(1.702 g) * (u + 1)."""

    def __init__(self, d, inner, limit=0.5):
        super().__init__()
        self.gate_up, self.down, self.limit = nn.Linear(d, 2 * inner), nn.Linear(inner, d), limit

    def forward(self, x):
        h = self.gate_up(x)
        gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.limit, self.limit)
        return self.down((up + 1) * (gate * torch.sigmoid(gate * 1.702)))


ClampedGLUExperts = with_experts(WhereScatterAdd, ClampedGLU, "ClampedGLUExperts")
# A limit (1000) beyond the usual activation range: the clamp must still be kept.
FarClampedGLUExperts = with_experts(WhereScatterAdd, lambda d, inner: ClampedGLU(d, inner, limit=1000.0),
                                    "FarClampedGLUExperts")


SUPPORTED_UNITS = [GeluGated, BiasedExperts, HandSpelledSiLUExperts, Relu2Experts, ClampedGLUExperts,
                   FarClampedGLUExperts]
