"""Attention for the groups one rank holds, with a rank-local KV cache.

Reuses the reference GroupAttention modules (q/k/v/o views of one KV-head block) and the
source model's own rotary and attention functions. OLMoE's q/k RMSNorm spans all heads: its
sum of squares over the rank's groups is all-reduced over the ring (one [B, T, 2] tensor per
layer, kind "qk_norm"), the reduction DESIGN.md calls out.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import FoEAttention
from ..models.attention import SumReduce, attend, project


class KVCache:
    """Per (layer, local group slot): keys and values [B, kv_heads, T_past, hd] of this rank only."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.length = 0  # tokens already cached (the same for every layer)

    def update(self, layer: int, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if (layer, slot) in self.entries:
            k0, v0 = self.entries[(layer, slot)]
            k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
        self.entries[(layer, slot)] = (k, v)
        return k, v


def causal_mask(T: int, past: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Additive mask [1, 1, T, past + T] (query i sees keys <= past + i); None for one query."""
    if T == 1:
        return None
    q = torch.arange(T, device=device)[:, None] + past
    k = torch.arange(past + T, device=device)[None, :]
    mask = torch.zeros(T, past + T, dtype=dtype, device=device)
    return mask.masked_fill_(k > q, torch.finfo(dtype).min)[None, None]


class LocalAttention(nn.Module):
    """The attention of `local` groups of a reference FoEAttention (or a 1-group full attention).

    forward: x [n_local, B, T, d] (each group's normed input) -> [n_local, B, T, d], each group's
    output times `scale` (H: the cross-group mean then reproduces the source's sum).
    """

    def __init__(self, attn: FoEAttention, local: list[int], scale: float, sum_reduce: SumReduce | None,
                 device: torch.device) -> None:
        super().__init__()
        self.groups = nn.ModuleList(attn.groups[h] for h in local).to(device)
        self.layer_idx, self.spec, self.scale, self.sum_reduce = attn.layer_idx, attn.spec, scale, sum_reduce

    def forward(self, x: Tensor, position_embeddings: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        q, k, v = project(self.spec, self.groups, x, self.sum_reduce)
        cos, sin = position_embeddings
        out = []
        for slot, g in enumerate(self.groups):
            qh, kh = self.spec.rotary(q[slot], k[slot], cos, sin)
            vh = v[slot]
            if cache is not None:
                kh, vh = cache.update(self.layer_idx, slot, kh, vh)
            out.append(attend(self.spec, g, qh, kh, vh, mask, self.scale))
        return torch.stack(out)
