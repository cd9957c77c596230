"""Group-local attention: group h owns KV head block h, the query heads that read it, and the
matching columns of W_O, exactly as tensor parallelism splits attention (DESIGN.md).

Each group's output is scaled by H so that the cross-group mean reproduces the source's sum.
The groups' KV caches live side by side in one Hugging Face cache layer (group h = KV heads
[h*kv_per_group, (h+1)*kv_per_group)), the source's own layout, so `generate()` and cache
utilities keep working; a distributed rank keeps only its slice.
"""
from __future__ import annotations

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


class FoEAttention(nn.Module):
    """All H groups' attention of one layer (single-process reference).

    forward: x [H, B, T, d] (group h's normed input) -> [H, B, T, d] (group h's output, times H).
    """

    def __init__(self, source: nn.Module, num_groups: int, family: Family) -> None:
        super().__init__()
        self.groups = nn.ModuleList(GroupAttention(source, h, num_groups, family) for h in range(num_groups))
        self.layer_idx = source.layer_idx
        self.head_dim = source.head_dim
        self.qk_norm = family.qk_norm
        self.clip_qkv = getattr(source.config, "clip_qkv", None)
        if family.qk_norm == "full_width":
            self.q_full_width = source.q_proj.weight.shape[0]
            self.k_full_width = source.k_proj.weight.shape[0]
            self.norm_eps = source.q_norm.variance_epsilon
        self._rotary = source_function(source, "apply_rotary_pos_emb")
        self._eager = source_function(source, "eager_attention_forward")

    def forward(
        self,
        x: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> Tensor:
        H = len(self.groups)
        B, T = x.shape[1], x.shape[2]
        heads = lambda t: t.view(B, T, -1, self.head_dim)  # noqa: E731  [B, T, n, hd]
        q, k, v = zip(*(g.project(x[h]) for h, g in enumerate(self.groups)))
        q, k, v = list(q), list(k), list(v)
        if self.qk_norm == "full_width":
            q = self._full_width_rms_norm(q, [g.q_norm_weight for g in self.groups], self.q_full_width)
            k = self._full_width_rms_norm(k, [g.k_norm_weight for g in self.groups], self.k_full_width)
        elif self.qk_norm == "per_head":
            q = [g.q_norm(heads(t)).flatten(2) for g, t in zip(self.groups, q)]
            k = [g.k_norm(heads(t)).flatten(2) for g, t in zip(self.groups, k)]
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = ([t.clamp(-c, c) for t in ts] for ts in (q, k, v))
        q, k, v = ([heads(t).transpose(1, 2) for t in ts] for ts in (q, k, v))  # [B, n, T, hd]
        cos, sin = position_embeddings
        q, k = map(list, zip(*(self._rotary(qh, kh, cos, sin) for qh, kh in zip(q, k))))
        if past_key_values is not None:  # one cache layer, groups side by side on the head axis
            kv_heads = k[0].shape[1]
            k_all, v_all = past_key_values.update(torch.cat(k, 1), torch.cat(v, 1), self.layer_idx)
            k, v = list(k_all.split(kv_heads, 1)), list(v_all.split(kv_heads, 1))

        first = self.groups[0]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(first.config._attn_implementation, self._eager)
        out = []
        for g, qh, kh, vh in zip(self.groups, q, k, v):
            o, _ = attend(
                g, qh, kh, vh, attention_mask,
                dropout=0.0, scaling=g.scaling, sliding_window=g.sliding_window, **kwargs,
            )
            out.append(g.o_proj(o.reshape(B, T, -1)) * H)
        return torch.stack(out)

    def _full_width_rms_norm(self, parts: list[Tensor], weights: list[Tensor], width: int) -> list[Tensor]:
        """RMSNorm over all heads when each group holds a slice: sum of squares reduced across
        groups (in a distributed run, one small all-reduce of [B, T] per q and k)."""
        dtype = parts[0].dtype
        parts32 = [p.float() for p in parts]
        variance = sum(p.pow(2).sum(-1, keepdim=True) for p in parts32) / width
        inv = torch.rsqrt(variance + self.norm_eps)
        return [w * (p * inv).to(dtype) for p, w in zip(parts32, weights)]
