"""Attention for the groups one rank holds, with a rank-local KV cache.

Reuses the reference GroupAttention modules (q/k/v/o views of one KV-head block) and the
source model's own rotary and attention functions. OLMoE's q/k RMSNorm spans all heads: its
sum of squares over the rank's groups is all-reduced over the ring (one [B, T, 2] tensor per
layer, kind "qk_norm"), the reduction DESIGN.md calls out.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..models import FoEAttention

SumReduce = Callable[[Tensor], Tensor]  # [B, T, 2] partial sums of squares -> totals


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
        self.layer_idx, self.head_dim, self.qk_norm = attn.layer_idx, attn.head_dim, attn.qk_norm
        self.clip_qkv, self.scale, self.sum_reduce = attn.clip_qkv, scale, sum_reduce
        if self.qk_norm == "full_width":
            self.widths, self.norm_eps = (attn.q_full_width, attn.k_full_width), attn.norm_eps
        self._rotary, self._eager = attn._rotary, attn._eager

    def forward(self, x: Tensor, position_embeddings: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        B, T = x.shape[1], x.shape[2]
        heads = lambda t: t.view(B, T, -1, self.head_dim)  # noqa: E731  [B, T, n, hd]
        q, k, v = map(list, zip(*(g.project(x[i]) for i, g in enumerate(self.groups))))
        if self.qk_norm == "full_width":
            q, k = self._full_width_rms_norm(q, k)
        elif self.qk_norm == "per_head":
            q = [g.q_norm(heads(t)).flatten(2) for g, t in zip(self.groups, q)]
            k = [g.k_norm(heads(t)).flatten(2) for g, t in zip(self.groups, k)]
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = ([t.clamp(-c, c) for t in ts] for ts in (q, k, v))
        cos, sin = position_embeddings
        out = []
        for slot, g in enumerate(self.groups):
            qh, kh, vh = (heads(t).transpose(1, 2) for t in (q[slot], k[slot], v[slot]))  # [B, n, T, hd]
            qh, kh = self._rotary(qh, kh, cos, sin)
            if cache is not None:
                kh, vh = cache.update(self.layer_idx, slot, kh, vh)
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(g.config._attn_implementation, self._eager)
            o, _ = attend(g, qh, kh, vh, mask, dropout=0.0, scaling=g.scaling, sliding_window=g.sliding_window)
            out.append(g.o_proj(o.reshape(B, T, -1)) * self.scale)
        return torch.stack(out)

    def _full_width_rms_norm(self, q: list[Tensor], k: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """RMSNorm over all heads: partial sums of squares [B, T, 2] summed across groups and ranks."""
        dtype = q[0].dtype
        q32, k32 = [t.float() for t in q], [t.float() for t in k]
        sums = torch.cat([sum(t.pow(2).sum(-1, keepdim=True) for t in ts) for ts in (q32, k32)], -1)
        if self.sum_reduce is not None:
            sums = self.sum_reduce(sums)
        inv_q, inv_k = (torch.rsqrt(sums[..., i:i + 1] / w + self.norm_eps) for i, w in enumerate(self.widths))
        q = [g.q_norm_weight * (t * inv_q).to(dtype) for g, t in zip(self.groups, q32)]
        k = [g.k_norm_weight * (t * inv_k).to(dtype) for g, t in zip(self.groups, k32)]
        return q, k
