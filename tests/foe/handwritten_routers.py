"""Routing written by hand for the FX path's matchers, on the per-expert loop of handwritten_moes.WhereIndexAdd.

FUSED_VARIANTS route in ways foe::sum_route_dispatch computes (fused, in both forms); GRAPH_ROUTED route in
ways it does not (the routing stays as written and only the experts are lowered), with a fragment of the
reason the report gives. DenseWeightedInput is Llama 4's MoE: dense experts weighting their input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from handwritten_moes import WhereIndexAdd
from torch import nn


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
