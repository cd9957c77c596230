"""The MLP share of one rank in FoE and exact runtimes: its groups' experts (or dense shares)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import FoEDenseMLP
from .accounting import Comm
from .dispatch import dispatch_combine, slice_experts


class LocalMLP(nn.Module):
    """xn [T, d] (replicated Norm2 output) -> m [n_local, T, d], group h's weighted expert output
    plus its share of a shared expert, for the rank's local groups.

    With `intra` (a group spread over s ranks), this rank holds experts [j*E/(H*s), ...) of its
    group's block and the group's picks travel by all-to-all inside the group.
    """

    def __init__(self, mlp: nn.Module, local: list[int], device: torch.device, intra: Comm | None = None,
                 layer: int = 0) -> None:
        super().__init__()
        self.layer, self.intra = layer, intra
        self.dense = isinstance(mlp, FoEDenseMLP)
        if self.dense:
            self.shares = nn.ModuleList(mlp.shares[h] for h in local).to(device)
            return
        self.router = mlp.router.to(device)
        groups = [mlp.groups[h] for h in local]
        self.block = groups[0].num_experts  # E/H
        if intra is None:
            self.experts = nn.ModuleList(slice_experts(g, 0, g.num_experts, device) for g in groups)
        else:
            per = self.block // intra.size
            j = intra.rank
            self.experts = nn.ModuleList([slice_experts(groups[0], j * per, (j + 1) * per, device)])
            self.per_rank = per
        self.first_ids = [g.first_id for g in groups]
        self.shared = nn.ModuleList(mlp.shared[h] for h in local).to(device) if mlp.shared is not None else None
        self.shared_gate = mlp.shared_gate.to(device) if mlp.shared is not None else None

    def forward(self, xn: Tensor) -> Tensor:
        if self.dense:
            return torch.stack([s(xn) for s in self.shares])
        ids, weights = self.router.route(self.router.scores(xn), xn.dtype)
        if self.intra is None:
            m = torch.stack([e(xn, ids, weights) for e in self.experts])
        else:  # only this group's picks, to the group rank that owns each expert
            first = self.first_ids[0]
            mine = ((ids >= first) & (ids < first + self.block)).nonzero()[:, 1].view(ids.shape[0], -1)
            ids_h, w_h = ids.gather(1, mine), weights.gather(1, mine)
            owner = (ids_h - first) // self.per_rank
            m = dispatch_combine(self.intra, xn, ids_h, w_h, owner, self.experts[0], layer=self.layer)[None]
        if self.shared is not None:  # the scalar gate is replicated, so it scales each share
            gate = torch.sigmoid(self.shared_gate(xn))
            m = m + torch.stack([gate * s(xn) for s in self.shared])
        return m
