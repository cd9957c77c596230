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

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.route(self.scores(x), x.dtype)

    def route(self, probs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.quota:
            values, ids = quota_top_k(probs, self.num_groups, self.top_k)
        else:
            values, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:  # over all k picks of all groups: every group sees the same scores
            values = values / values.sum(dim=-1, keepdim=True)
        return ids, values.to(dtype)


def quota_top_k(probs: Tensor, num_groups: int, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-(k/H) inside each of H equal expert blocks: probs [T, E] -> (values, ids) [T, k],
    group h's picks in columns [h*k/H, (h+1)*k/H), ids in assignment order."""
    T, E = probs.shape
    block = E // num_groups
    values, local = torch.topk(probs.view(T, num_groups, block), top_k // num_groups, dim=-1)
    offsets = torch.arange(num_groups, device=probs.device).view(1, num_groups, 1) * block
    return values.reshape(T, top_k), (local + offsets).reshape(T, top_k)


class GroupExperts(nn.Module):
    """The SwiGLU experts of one group's block; evaluates only the picks that land in it.

    forward: x [T, d], ids [T, n] (assignment order), weights [T, n] -> [T, d] = sum over the
    group's picks of w * down(act(gate(x)) * up(x)).
    """

    def __init__(self, gate_up_proj: Tensor, down_proj: Tensor, first_id: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = view_parameter(gate_up_proj)  # [E/H, 2I, d], gate rows first
        self.down_proj = view_parameter(down_proj)  # [E/H, d, I]
        self.first_id = first_id
        self.act_fn = act_fn

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        local = ids - self.first_id
        for e in range(self.num_experts):
            token, slot = torch.where(local == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out


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
    """The MoE block of one layer, split into H groups.

    forward: xn [T, d] (Norm2 of r_full) -> m [H, T, d], group h's weighted expert output
    (plus its share of a shared expert). The caller combines: exact mode sums over groups
    (second all-reduce); FoE mode keeps m_h in group h's stream.
    """

    def __init__(self, block: nn.Module, perm: list[int], num_groups: int, top_k: int, renormalize: bool,
                 quota: bool) -> None:
        super().__init__()
        experts = block.experts
        E = experts.gate_up_proj.shape[0]
        step = E // num_groups
        self.router = Router(block.gate.weight, perm, num_groups, top_k, renormalize, quota)
        self.groups = nn.ModuleList()
        for h in range(num_groups):
            ids = perm[h * step:(h + 1) * step]
            contiguous = ids == list(range(ids[0], ids[0] + step))
            # Contiguous blocks are views; a calibrated permutation has to gather (a copy).
            gate_up = experts.gate_up_proj[ids[0]:ids[0] + step] if contiguous else experts.gate_up_proj[ids]
            down = experts.down_proj[ids[0]:ids[0] + step] if contiguous else experts.down_proj[ids]
            self.groups.append(GroupExperts(gate_up, down, h * step, experts.act_fn))
        self.shared = split_mlp(block.shared_expert, num_groups) if hasattr(block, "shared_expert") else None
        self.shared_gate = LinearSlice(block.shared_expert_gate.weight, None) if self.shared is not None else None
        self.last_routing: tuple[Tensor, Tensor, Tensor] | None = None  # set while recording
        self.record = False

    def forward(self, xn: Tensor) -> Tensor:
        probs = self.router.scores(xn)
        ids, weights = self.router.route(probs, xn.dtype)
        if self.record:
            self.last_routing = (probs.detach(), ids.detach(), weights.detach())
        m = torch.stack([g(xn, ids, weights) for g in self.groups])
        if self.shared is not None:  # the scalar gate is replicated, so it scales each share
            gate = torch.sigmoid(self.shared_gate(xn))
            m = m + torch.stack([gate * s(xn) for s in self.shared])
        return m


class FoEDenseMLP(nn.Module):
    """A dense layer's MLP (Qwen's mlp_only_layers) split tensor-parallel: xn [T, d] -> [H, T, d]."""

    def __init__(self, mlp: nn.Module, num_groups: int) -> None:
        super().__init__()
        self.shares = split_mlp(mlp, num_groups)

    def forward(self, xn: Tensor) -> Tensor:
        return torch.stack([s(xn) for s in self.shares])
