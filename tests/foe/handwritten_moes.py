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
    """token, slot = torch.where(ids == e); out.index_add_(0, token, y)."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(h[token]) * w[token, slot, None])
        return out.view_as(x)


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


class WhereScatterAdd(_Base):
    """Combine with scatter_add_ over token indices expanded to [n, d]."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            y = expert(h[token]) * w[token, slot, None]
            out.scatter_add_(0, token[:, None].expand(-1, h.shape[-1]), y)
        return out.view_as(x)


class WhereIndexPut(_Base):
    """Combine with index_put_(..., accumulate=True) (what `out[token] += y` does not do)."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_put_((token,), expert(h[token]) * w[token, slot, None], accumulate=True)
        return out.view_as(x)


class TopkThenSoftmax(WhereIndexAdd):
    """Mixtral's router spelling: top-k on the logits, softmax over the k picks."""

    def route(self, x):
        logits, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        return F.softmax(logits, dim=-1), ids


class UnnormalisedWhere(_Base):
    """No renormalisation of the top-k probabilities (OLMoE's default)."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = torch.topk(self.router(h).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, w[token, slot, None] * expert(h[token]))
        return out.view_as(x)


class StackedMatmul(_Base):
    """Stacked expert weights stored [in, out] and applied with @ on the gathered tokens:
    h[token] @ w_in[e] -> chunk -> silu(g) * u -> @ w_out[e]."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        del self.experts
        self.w_in = nn.Parameter(torch.randn(num_experts, d, 2 * inner) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, inner, d) / inner ** 0.5)

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e in range(self.num_experts):
            token, slot = torch.where(ids == e)
            gate, up = (h[token] @ self.w_in[e]).chunk(2, dim=-1)
            out.index_add_(0, token, (F.silu(gate) * up) @ self.w_out[e] * w[token, slot, None])
        return out.view_as(x)


class FlatMatmulTransposed(_Base):
    """DBRX's layout: every expert's rows in one flat [E * inner, d] matrix per projection, viewed
    per expert; gate and up read through .T, down directly."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        del self.experts
        self.inner = inner
        self.w1, self.v1, self.w2 = (nn.Parameter(torch.randn(num_experts * inner, d) / d ** 0.5) for _ in range(3))

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e in range(self.num_experts):
            token, slot = torch.where(ids == e)
            w1, v1, w2 = (p.view(self.num_experts, self.inner, -1)[e] for p in (self.w1, self.v1, self.w2))
            y = (F.silu(h[token].matmul(w1.T)) * h[token].matmul(v1.T)).matmul(w2)
            out.index_add_(0, token, y * w[token, slot, None])
        return out.view_as(x)


class SortSplit(_Base):
    """Sort the picks by expert, split the gathered tokens by per-expert counts (tolist), run each
    expert on its chunk, concatenate, weight by the sorted weights and index_add_ back."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        flat = ids.flatten()
        order = flat.argsort()
        token = order // self.top_k
        counts = F.one_hot(flat, self.num_experts).sum(0).tolist()
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, h[token].split(counts))])
        return torch.zeros_like(h).index_add_(0, token, y * w.flatten()[order, None]).view_as(x)


class ParallelExperts(_Base):
    """JetMoE's layout: stable sort, counts by a scatter of ones, one gate_up GEMM per chunk of a
    stacked [E, 2I, d] weight, the unit across all rows at once, split again for the down GEMMs."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        del self.experts
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * inner, d) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, d, inner) / inner ** 0.5)

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        counts = torch.zeros(h.shape[0], self.num_experts, dtype=w.dtype).scatter(1, ids, 1).long().sum(0).tolist()
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


# ---- blocks that compute something foe:: ops do not: left as written, with a reason -------------

class OffsetAccumulator(_Base):
    """The per-expert loop accumulates into a scaled copy of the input, not into zeros."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = h * 0.01
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(h[token]) * w[token, slot, None])
        return out.view_as(x)


class ScaledIndexAdd(_Base):
    """index_add_ with alpha != 1 scales every expert's contribution."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(h[token]) * w[token, slot, None], alpha=1.01)
        return out.view_as(x)


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


class WeightsOnInput(_Base):
    """Llama 4's spelling: the routing weight scales the expert's input, not its output."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(h[token] * w[token, slot, None]))
        return out.view_as(x)


class DenseWeightedInput(nn.Module):
    """Llama 4's MoE written by hand: top-k on the router logits, the picks scattered into a -inf matrix and
    scored by sigmoid (0 where not picked); every expert runs on every token with bmm on stacked weights
    (gate_up [E, d, 2I], down [E, I, d]), its input scaled by its routing weight; summed over the experts."""

    fill = float("-inf")

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.router = nn.Linear(d, num_experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(num_experts, d, 2 * inner) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(num_experts, inner, d) / inner ** 0.5)

    def scores(self, h):
        logits = self.router(h)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.sigmoid(torch.full_like(logits, self.fill).scatter(-1, ids, top))

    def project(self, routed):
        gate, up = torch.bmm(routed, self.gate_up).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down)

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        scores = self.scores(h)  # [T, E]
        routed = (h.repeat(self.num_experts, 1) * scores.t().reshape(-1, 1)).view(self.num_experts, -1, h.shape[-1])
        return self.project(routed).view(self.num_experts, -1, h.shape[-1]).sum(0).view_as(x)


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


class ScaledCombine(WhereIndexAdd):
    """A routed scaling factor (DeepSeek-V3's) applied to the weights."""

    def route(self, x):
        w, ids = super().route(x)
        return w * 2.5, ids


class SigmoidRouter(WhereIndexAdd):
    def route(self, x):
        weights, ids = torch.topk(torch.sigmoid(self.router(x)), self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids


class BiasedRouter(WhereIndexAdd):
    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        self.router = nn.Linear(d, num_experts, bias=True)


class SmallestTopk(WhereIndexAdd):
    def route(self, x):
        return torch.topk(F.softmax(self.router(x), dim=-1), self.top_k, dim=-1, largest=False)


class CorrectedSigmoid(WhereIndexAdd):
    """DeepSeek-V3's routing without groups: sigmoid scores, a selection-only correction bias, weights
    the uncorrected scores at the picks, renormalised, times a routed scaling factor."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        self.correction = nn.Parameter(torch.randn(num_experts) * 0.1)

    def route(self, x):
        scores = torch.sigmoid(self.router(x).float())
        ids = torch.topk(scores + self.correction, self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        return weights / weights.sum(-1, keepdim=True) * 1.5, ids


class GroupLimited(WhereIndexAdd):
    """Group-limited top-k (DeepSeek-V2's greedy groups, scored by their maximum): only experts of the best
    half compete."""

    def route(self, x):
        scores = F.softmax(self.router(x), dim=-1)
        groups = scores.view(*scores.shape[:-1], 2, -1)
        best = groups.max(-1).values.argmax(-1, keepdim=True)
        mask = torch.zeros_like(groups[..., 0]).scatter(-1, best, 1.0).unsqueeze(-1).expand_as(groups)
        weights, ids = torch.topk(scores.masked_fill(mask.reshape(scores.shape) == 0, 0.0), self.top_k, dim=-1)
        return weights, ids


class GroupLimitedTop2(WhereIndexAdd):
    """DeepSeek-V3's group limit: 2 groups scored by the sum of their top-2 corrected sigmoid scores, the
    best kept, the others masked to -inf; weights the uncorrected scores / (their sum + 1e-20) * 2.5."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        self.correction = nn.Parameter(torch.randn(num_experts) * 0.1)

    def route(self, x):
        scores = torch.sigmoid(self.router(x).float())
        select = scores + self.correction
        group_scores = select.view(-1, 2, self.num_experts // 2).topk(2, dim=-1)[0].sum(dim=-1)
        best = torch.topk(group_scores, k=1, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, best, 1)
        mask = mask.unsqueeze(-1).expand(-1, 2, self.num_experts // 2).reshape(-1, self.num_experts)
        ids = torch.topk(select.masked_fill(~mask.bool(), float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * 2.5, ids


class ExpertScaled(WhereIndexAdd):
    """Gemma 4's per-expert output scale after the renormalisation, here with Ernie 4.5's clamped sum."""

    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        self.per_expert_scale = nn.Parameter(torch.rand(num_experts) + 0.5)

    def route(self, x):
        weights, ids = torch.topk(F.softmax(self.router(x), dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=1e-12)
        return weights * self.per_expert_scale[ids], ids


class SigmoidOfTopLogits(WhereIndexAdd):
    """Top-k on the logits, each pick weighted by its sigmoid (Llama 4's scores)."""

    def route(self, x):
        logits, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        return torch.sigmoid(logits.float()), ids


# Routing variants foe::sum_route_dispatch computes (scoring, router bias, correction bias, routed
# scaling, group limit, renormalisation eps, per-expert scale, top-k on the logits): fused, in both forms.
FUSED_VARIANTS = [SigmoidRouter, BiasedRouter, ScaledCombine, CorrectedSigmoid, GroupLimitedTop2, ExpertScaled,
                  SigmoidOfTopLogits]

# Routing foe::sum_route_dispatch does not compute: the routing stays as written and only the
# experts are lowered (exact form); the FoE form, which needs quota routing in the fused op, refuses.
# (class, a fragment of the reason the report gives)
class SelectOnHalf(CorrectedSigmoid):
    """Experts selected on fp16-rounded corrected scores (weights the fp32 scores): the rounding
    decides near-ties, so the fused op (which selects in fp32) would pick other experts there."""

    def route(self, x):
        scores = torch.sigmoid(self.router(x).float())
        ids = torch.topk((scores + self.correction).half(), self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        return weights / weights.sum(-1, keepdim=True) * 1.5, ids


class SoftmaxOverHalves(WhereIndexAdd):
    """A softmax over each half of the experts (a view regroups the logits), top-k over all."""

    def route(self, x):
        logits = self.router(x)
        probs = F.softmax(logits.view(-1, 2, self.num_experts // 2), dim=-1).view(-1, self.num_experts)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), ids


class RenormPlusScaledEps(WhereIndexAdd):
    """w / (sum + 10 * 0.1) spelled with add's alpha: not an eps of 0.1."""

    def route(self, x):
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.top_k, dim=-1)
        return w / torch.add(w.sum(-1, keepdim=True), 0.1, alpha=10), ids


GRAPH_ROUTED = [
    (SelectOnHalf, "router scores come from to.dtype"),
    (SoftmaxOverHalves, "router softmax over 2 of the 4 router outputs"),
    (RenormPlusScaledEps, "routing weights are changed after the router"),
    (SmallestTopk, "largest=False"),
    (GroupLimited, "not DeepSeek-V3's group limit"),
    (DenseWeightedInput, "top-k on logits"),  # Llama 4's routing; dense experts weighting their input
]

# Expert computations foe::experts_swiglu does not express: left as written, with the reason.
class SortSplitReversedCounts(SortSplit):
    """Chunk sizes in reverse expert order: chunk e holds other experts' rows."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        flat = ids.flatten()
        order = flat.argsort()
        token = order // self.top_k
        counts = F.one_hot(flat, self.num_experts).sum(0).flip(0).tolist()
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, h[token].split(counts))])
        return torch.zeros_like(h).index_add_(0, token, y * w.flatten()[order, None]).view_as(x)


class SortSplitUnsortedWeights(SortSplit):
    """The weights taken in pick order instead of the sorted order."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        flat = ids.flatten()
        order = flat.argsort()
        token = order // self.top_k
        counts = F.one_hot(flat, self.num_experts).sum(0).tolist()
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, h[token].split(counts))])
        return torch.zeros_like(h).index_add_(0, token, y * w.flatten()[:, None]).view_as(x)


class FirstSlotWeights(_Base):
    """Every pick weighted by its token's first routing weight (w[token, 0], not w[token, slot])."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(h[token]) * w[token, 0, None])
        return out.view_as(x)


class SwappedColumns(_Base):
    """where(ids == e) read as (slot, token): the columns swapped."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(ids == e)
            out.index_add_(0, token, expert(h[token]) * w[slot, token, None])
        return out.view_as(x)


class PrunedThroughView(WhereIndexAdd):
    """Renormalised weights below 0.3 zeroed in place through a view, after which the weights are read."""

    def route(self, x):
        w, ids = super().route(x)
        w.view(-1).masked_fill_(w.view(-1) < 0.3, 0)
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
