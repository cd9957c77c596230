"""Routing and group-local experts.

The router is replicated on every group and computes global scores over all E experts;
routing-weight normalisation uses those same scores, so it needs no communication. In FoE
mode each group picks its quota of k/H experts inside its own block; in exact mode the
global top-k is kept and each group evaluates the picks that fall in its block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import ops, reference  # noqa: F401  (ops registers torch.ops.foe)
from ..kernels.reference import expert_activation
from .views import LinearSlice, view_parameter


class Router(nn.Module):
    """x [T, d] -> (expert ids [T, k] in assignment order, routing weights [T, k]).

    Expert numbering: position j in the assignment order is source expert perm[j]; group h
    owns positions [h*E/H, (h+1)*E/H).
    """

    def __init__(self, weight: Tensor, perm: list[int], num_groups: int, top_k: int, renormalize: bool,
                 quota: bool) -> None:
        super().__init__()
        self.weight = view_parameter(weight)  # [E, d], source expert order
        identity = perm == list(range(len(perm)))
        self.register_buffer("perm", None if identity else torch.tensor(perm), persistent=False)
        self.num_groups, self.top_k, self.renormalize, self.quota = num_groups, top_k, renormalize, quota

    def scores(self, x: Tensor) -> Tensor:
        """Softmax router probabilities [T, E] (fp32), in assignment order."""
        probs = F.softmax(F.linear(x, self.weight).float(), dim=-1)
        return probs if self.perm is None else probs[:, self.perm]

    def route(self, probs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Renormalisation is over all k picks of all groups: every group sees the same scores.
        _, ids = reference.route(probs, self.num_groups if self.quota else 1, self.top_k)
        return ids, reference.routing_weights(probs, ids, self.renormalize, dtype)


class GroupExperts(nn.Module):
    """The gated experts of one group's block; evaluates only the picks that land in it, with one
    foe::experts_swiglu call (the op convert() uses, so the distributed runtime runs the same kernels).

    forward: x [T, d], ids [T, n] (assignment order), weights [T, n] -> [T, d] = sum over the
    group's picks of w * down(act(gate(x)) * up(x)).
    """

    def __init__(self, gate_up_proj: Tensor, down_proj: Tensor, first_id: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = view_parameter(gate_up_proj)  # [E/H, 2I, d], gate rows first
        self.down_proj = view_parameter(down_proj)  # [E/H, d, I]
        self.first_id = first_id
        self.act_fn = act_fn
        self.activation = expert_activation(act_fn)
        if self.activation is None:
            raise ValueError(f"experts with activation {type(act_fn).__name__}: foe::experts_swiglu computes silu, "
                             "gelu or gelu_tanh gated units")

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        local = ids - self.first_id
        token, slot = torch.where((local >= 0) & (local < self.num_experts))  # the picks in this block
        picks = local[token, slot].unsqueeze(1)  # one pick per row of x[token]
        pairs, offsets = reference.group_by_expert(picks, self.num_experts)
        y = torch.ops.foe.experts_swiglu(x[token], self.gate_up_proj, self.down_proj, picks,
                                         weights[token, slot, None].to(x.dtype), pairs, offsets, 1, self.activation)
        return torch.zeros_like(x).index_add_(0, token, y[0])


class SplitMLP(nn.Module):
    """A dense SwiGLU MLP's share for one group: intermediate units [i0, i1) (tensor-parallel
    style); the groups' outputs sum to the full MLP."""

    def __init__(self, mlp: nn.Module, i0: int, i1: int) -> None:
        super().__init__()
        self.gate_proj = LinearSlice.rows(mlp.gate_proj, i0, i1)
        self.up_proj = LinearSlice.rows(mlp.up_proj, i0, i1)
        self.down_proj = LinearSlice.cols(mlp.down_proj, i0, i1, with_bias=False)
        self.act_fn = mlp.act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def split_mlp(mlp: nn.Module, num_groups: int) -> nn.ModuleList:
    width = mlp.gate_proj.weight.shape[0]
    if width % num_groups:
        raise ValueError(f"MLP intermediate size {width} is not divisible by H={num_groups}")
    step = width // num_groups
    return nn.ModuleList(SplitMLP(mlp, h * step, (h + 1) * step) for h in range(num_groups))


class FoEMoE(nn.Module):
    """The MoE block of one layer, split into H groups, at the foe:: op boundary.

    route(residual, partials, norm) -> (r_full, xn, ids, weights, pairs, offsets): the cross-group
        mean, Norm2, router, per-group (FoE) or global (exact) top-k and the grouping of tokens
        by expert, fused in foe::sum_route_dispatch.
    forward(xn, ids, weights, pairs, offsets) -> m [H, T, d]: group h's weighted expert output
        (foe::experts_swiglu) plus its share of a shared expert. The caller combines: exact
        mode sums over groups (second all-reduce); FoE mode keeps m_h in group h's stream.
    Expert weights are held in assignment order: a view of the source for contiguous
    assignment, a permuted copy otherwise. `groups` gives per-group views (distributed ranks).
    """

    def __init__(self, block: nn.Module, perm: list[int], num_groups: int, top_k: int, renormalize: bool,
                 quota: bool) -> None:
        super().__init__()
        experts = block.experts
        identity = perm == list(range(len(perm)))
        self.router = Router(block.gate.weight, perm, num_groups, top_k, renormalize, quota)
        self.gate_up_proj = view_parameter(experts.gate_up_proj if identity else experts.gate_up_proj[perm])
        self.down_proj = view_parameter(experts.down_proj if identity else experts.down_proj[perm])
        self.act_fn = experts.act_fn
        self.activation = expert_activation(experts.act_fn)  # convert() refused the experts if None
        self.num_groups = num_groups
        self.shared = split_mlp(block.shared_expert, num_groups) if hasattr(block, "shared_expert") else None
        self.shared_gate = LinearSlice(block.shared_expert_gate.weight, None) if self.shared is not None else None
        self.last_routing: tuple[Tensor, Tensor, Tensor] | None = None  # set while recording
        self.record = False

    @property
    def groups(self) -> list[GroupExperts]:
        """Group h's experts as views: block [h*E/H, (h+1)*E/H) of the assignment order."""
        step = self.gate_up_proj.shape[0] // self.num_groups
        return [GroupExperts(self.gate_up_proj[h * step:(h + 1) * step], self.down_proj[h * step:(h + 1) * step],
                             h * step, self.act_fn) for h in range(self.num_groups)]

    def route(self, residual: Tensor, partials: Tensor, norm: nn.Module) -> tuple[Tensor, ...]:
        """residual [1 or H, T, d], partials [H, T, d] -> foe::sum_route_dispatch outputs."""
        r = self.router
        weight = r.weight if r.perm is None else r.weight[r.perm]  # router rows in assignment order
        return torch.ops.foe.sum_route_dispatch(residual, partials, norm.weight, norm.variance_epsilon, weight,
                                                r.num_groups if r.quota else 1, r.top_k, r.renormalize)

    def forward(self, xn: Tensor, ids: Tensor, weights: Tensor, pairs: Tensor, offsets: Tensor) -> Tensor:
        if self.record:
            self.last_routing = (self.router.scores(xn).detach(), ids.detach(), weights.detach())
        m = torch.ops.foe.experts_swiglu(xn, self.gate_up_proj, self.down_proj, ids, weights, pairs, offsets,
                                         self.num_groups, self.activation)
        if self.shared is not None:  # the scalar gate is replicated, so it scales each share
            gate = torch.sigmoid(self.shared_gate(xn))
            m = m + torch.stack([gate * s(xn) for s in self.shared])
        return m


class FoEDenseMLP(nn.Module):
    """A dense layer's MLP (Qwen's mlp_only_layers) split tensor-parallel: xn [..., d] -> [H, ..., d]."""

    def __init__(self, mlp: nn.Module, num_groups: int) -> None:
        super().__init__()
        self.shares = split_mlp(mlp, num_groups)

    def forward(self, xn: Tensor) -> Tensor:
        return torch.stack([s(xn) for s in self.shares])
