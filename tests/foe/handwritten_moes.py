"""MoE blocks written by hand in the ways people write them, for the FX path's matchers.

Each class is plain PyTorch, independent of foe_compile: the eager module is the reference the
converted graph is compared with. SUPPORTED compute sum_k w_k * SwiGLU_{e_k}(x) and must be
rewritten; REFUSED compute something else (another activation, biases, weights applied to the
input, a scaled combine, another router) and must be left as written, with a reason.
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


SUPPORTED = [DenseLoopMoE, IndexAddLoopMoE, WhereIndexAdd, NonzeroIndexAdd, WhereScatterAdd, WhereIndexPut,
             TopkThenSoftmax, UnnormalisedWhere]


# ---- blocks that compute something foe:: ops do not: left as written, with a reason -------------

class GeluGLU(SwiGLU):
    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


class GeluGated(WhereIndexAdd):
    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        self.experts = nn.ModuleList(GeluGLU(d, inner) for _ in range(num_experts))


class BiasedExperts(WhereIndexAdd):
    def __init__(self, d, inner, num_experts, top_k):
        super().__init__(d, inner, num_experts, top_k)
        for expert in self.experts:
            expert.w2 = nn.Linear(inner, d, bias=True)


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


# Routing foe::sum_route_dispatch does not compute: the routing stays as written and only the
# experts are lowered (exact form); the FoE form, which needs quota routing in the fused op, refuses.
# (class, a fragment of the reason the report gives)
GRAPH_ROUTED = [
    (SigmoidRouter, "sigmoid"),
    (BiasedRouter, "has a bias"),
    (ScaledCombine, "routed scaling factor"),
    (SmallestTopk, "largest=False"),
]

# Expert computations foe::experts_swiglu does not express: left as written, with the reason.
REFUSED = [
    (GeluGated, "uses gelu"),
    (BiasedExperts, "not a bias-free"),
    (WeightsOnInput, "without being multiplied by their routing weights"),
]
