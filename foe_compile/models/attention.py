"""Group-local attention: group h owns KV head block h, the query heads that read it, and the
matching columns of W_O, exactly as tensor parallelism splits attention (DESIGN.md).

Each group's output is scaled by H so that the cross-group mean reproduces the source's sum.
The groups' KV caches live side by side in one Hugging Face cache layer (group h = KV heads
[h*kv_per_group, (h+1)*kv_per_group)), the source's own layout, so `generate()` and cache
utilities keep working; a distributed rank keeps only its slice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..families import Family, source_function
from .views import LinearSlice, view_parameter


class GroupAttention(nn.Module):
    """One KV-head group's projections: x [B, T, d] -> q [B, T, q_heads*hd], k, v [B, T, kv_heads*hd]."""

    def __init__(self, source: nn.Module, group: int, num_groups: int, family: Family) -> None:
        super().__init__()
        cfg = source.config
        hd = source.head_dim
        q_heads = cfg.num_attention_heads // num_groups
        kv_heads = cfg.num_key_value_heads // num_groups
        q0, q1 = group * q_heads * hd, (group + 1) * q_heads * hd
        k0, k1 = group * kv_heads * hd, (group + 1) * kv_heads * hd
        self.group, self.num_groups, self.head_dim = group, num_groups, hd
        self.q_proj = LinearSlice.rows(source.q_proj, q0, q1)
        self.k_proj = LinearSlice.rows(source.k_proj, k0, k1)
        self.v_proj = LinearSlice.rows(source.v_proj, k0, k1)
        # Row-parallel W_O: every group adds the (replicated) bias; the mean keeps it once.
        self.o_proj = LinearSlice.cols(source.o_proj, q0, q1, with_bias=True)
        # Attributes the Hugging Face attention functions read from `module`.
        self.config = cfg
        self.num_key_value_groups = source.num_key_value_groups
        self.is_causal = True
        self.scaling = source.scaling
        self.sliding_window = getattr(source, "sliding_window", None)
        if family.qk_norm == "per_head":  # one RMSNorm over head_dim, shared by all heads
            self.q_norm, self.k_norm = source.q_norm, source.k_norm
        elif family.qk_norm == "full_width":  # this group's slice of an RMSNorm over all heads
            self.q_norm_weight = view_parameter(source.q_norm.weight[q0:q1])
            self.k_norm_weight = view_parameter(source.k_norm.weight[k0:k1])

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


@dataclass(frozen=True)
class AttentionSpec:
    """What every group of one layer shares: head size, q/k norm kind, clipping, the source's
    rotary and eager-attention functions (reused for exactness)."""

    head_dim: int
    qk_norm: str
    clip_qkv: float | None
    full_widths: tuple[int, int] | None  # (q, k) widths of a full-width q/k RMSNorm
    norm_eps: float | None
    rotary: Callable
    eager: Callable


SumReduce = Callable[[Tensor], Tensor]  # [B, T, 2] partial sums of squares -> totals over all groups


def project(spec: AttentionSpec, groups, x: Tensor, sum_reduce: SumReduce | None = None):
    """x [n, B, T, d] (group i's normed input) -> q, k, v lists of [B, heads_i, T, hd], q/k normed
    and clipped as the source does (no rotary yet). With a full-width q/k norm the sums of squares
    of all groups are needed: `sum_reduce` adds the other ranks' (distributed runs)."""
    B, T = x.shape[1], x.shape[2]
    heads = lambda t: t.view(B, T, -1, spec.head_dim)  # noqa: E731  [B, T, n, hd]
    q, k, v = map(list, zip(*(g.project(x[i]) for i, g in enumerate(groups))))
    if spec.qk_norm == "full_width":
        q, k = _full_width_rms_norm(spec, groups, q, k, sum_reduce)
    elif spec.qk_norm == "per_head":
        q = [g.q_norm(heads(t)).flatten(2) for g, t in zip(groups, q)]
        k = [g.k_norm(heads(t)).flatten(2) for g, t in zip(groups, k)]
    if spec.clip_qkv is not None:
        c = spec.clip_qkv
        q, k, v = ([t.clamp(-c, c) for t in ts] for ts in (q, k, v))
    return tuple([heads(t).transpose(1, 2) for t in ts] for ts in (q, k, v))


def attend(spec: AttentionSpec, group: GroupAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
           scale: float, **kwargs) -> Tensor:
    """One group's attention and its W_O columns: [B, heads, T, hd] -> [B, T, d], times `scale`."""
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(group.config._attn_implementation, spec.eager)
    o, _ = fn(group, q, k, v, mask, dropout=0.0, scaling=group.scaling, sliding_window=group.sliding_window, **kwargs)
    return group.o_proj(o.reshape(q.shape[0], q.shape[2], -1)) * scale


def _full_width_rms_norm(spec: AttentionSpec, groups, q: list[Tensor], k: list[Tensor],
                         sum_reduce: SumReduce | None) -> tuple[list[Tensor], list[Tensor]]:
    """RMSNorm over all heads when each group holds a slice: the sums of squares [B, T, 2] of q
    and k are added across groups (and, distributed, across ranks: one small all-reduce)."""
    dtype = q[0].dtype
    q32, k32 = [t.float() for t in q], [t.float() for t in k]
    sums = torch.cat([sum(t.pow(2).sum(-1, keepdim=True) for t in ts) for ts in (q32, k32)], -1)
    if sum_reduce is not None:
        sums = sum_reduce(sums)
    inv_q, inv_k = (torch.rsqrt(sums[..., i:i + 1] / w + spec.norm_eps) for i, w in enumerate(spec.full_widths))
    return ([g.q_norm_weight * (t * inv_q).to(dtype) for g, t in zip(groups, q32)],
            [g.k_norm_weight * (t * inv_k).to(dtype) for g, t in zip(groups, k32)])


class FoEAttention(nn.Module):
    """All H groups' attention of one layer (single-process reference).

    forward: x [H, B, T, d] (group h's normed input) -> [H, B, T, d] (group h's output, times H).
    """

    def __init__(self, source: nn.Module, num_groups: int, family: Family) -> None:
        super().__init__()
        self.groups = nn.ModuleList(GroupAttention(source, h, num_groups, family) for h in range(num_groups))
        self.layer_idx = source.layer_idx
        full_width = family.qk_norm == "full_width"
        self.spec = AttentionSpec(
            head_dim=source.head_dim, qk_norm=family.qk_norm, clip_qkv=getattr(source.config, "clip_qkv", None),
            full_widths=(source.q_proj.weight.shape[0], source.k_proj.weight.shape[0]) if full_width else None,
            norm_eps=source.q_norm.variance_epsilon if full_width else None,
            rotary=source_function(source, "apply_rotary_pos_emb"),
            eager=source_function(source, "eager_attention_forward"),
        )

    def forward(
        self,
        x: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> Tensor:
        q, k, v = project(self.spec, self.groups, x)
        cos, sin = position_embeddings
        q, k = map(list, zip(*(self.spec.rotary(qh, kh, cos, sin) for qh, kh in zip(q, k))))
        if past_key_values is not None:  # one cache layer, groups side by side on the head axis
            kv_heads = k[0].shape[1]
            k_all, v_all = past_key_values.update(torch.cat(k, 1), torch.cat(v, 1), self.layer_idx)
            k, v = list(k_all.split(kv_heads, 1)), list(v_all.split(kv_heads, 1))
        H = len(self.groups)
        return torch.stack([attend(self.spec, g, qh, kh, vh, attention_mask, H, **kwargs)
                            for g, qh, kh, vh in zip(self.groups, q, k, v)])
