"""partition_groups: the exact form's attention split, one partial per KV-head group.

Rewrites o = linear(a, W_O) into o = mean_h(H * linear(a[..., heads of h], W_O[:, heads of h]))
(the cross-group all-reduce), keeping the per-group partials [H, ..., d] so that
fuse_sum_route_dispatch can feed them to foe::sum_route_dispatch. Group h owns KV heads
[h*kv/H, (h+1)*kv/H) and the query heads that read them (contiguous, as in tensor
parallelism). Exact up to summation order (H * x / H is exact for power-of-two H).
Expects find_gqa_attention's records; H is the largest value dividing every attention's
KV-head count and every MoE block's expert count (and top-k, for the FoE form) unless given.
Records each attention's per-group head slices for split_group_streams.
"""
from __future__ import annotations

import math

from torch import fx

from .infra import PassResult, aten, val
from .matches import ATTENTION_KEY, MOE_KEY, PARTIALS_KEY

GROUPS_KEY = "foe_num_groups"


def partition_groups(gm: fx.GraphModule, num_groups: int | None = None, mode: str = "exact") -> PassResult:
    H = group_count(gm, num_groups, mode)
    gm.meta[GROUPS_KEY] = H
    gm.meta[PARTIALS_KEY] = {}
    if H == 1:
        return PassResult("partition_groups", 0)
    attentions = gm.meta.get(ATTENTION_KEY, [])
    for attn in attentions:
        _split_o_proj(gm, attn, H)
    return PassResult("partition_groups", len(attentions))


def group_count(gm: fx.GraphModule, num_groups: int | None, mode: str) -> int:
    """H: as given (validated) or the largest valid, from the find_* passes' records."""
    attentions, blocks = gm.meta.get(ATTENTION_KEY, []), gm.meta.get(MOE_KEY, [])
    counts = [a.num_kv_heads for a in attentions] + [b.num_experts for b in blocks]
    if mode == "foe":  # quota routing: k/H picks per group
        counts += [b.top_k for b in blocks]
    if mode == "foe" and blocks and not attentions and num_groups is None:
        raise ValueError(
            "the FoE form groups experts by KV head, but no attention the passes recognise was found (q/k/v/o "
            "linear projections around scaled_dot_product_attention; gated, MLA, linear-attention and Mamba mixers "
            "are not defined for FoE yet), so H would silently be 1; convert with mode='exact' (or ask for num_groups explicitly)")
    H = num_groups if num_groups is not None else (math.gcd(*counts) if blocks and attentions else 1)
    if any(c % H for c in counts):
        what = "KV-head, expert and top-k counts" if mode == "foe" else "KV-head and expert counts"
        raise ValueError(f"num_groups={H} does not divide the {what} {sorted(set(counts))}; "
                         f"valid: {[h for h in range(1, math.gcd(*counts) + 1) if math.gcd(*counts) % h == 0]}")
    return H


def _split_o_proj(gm: fx.GraphModule, attn, H: int) -> None:
    g = gm.graph
    o = attn.o_proj
    a, weight = o.args[0], o.args[1]
    bias = o.args[2] if len(o.args) > 2 else None
    width = attn.num_heads // H * attn.head_dim
    with g.inserting_before(o.next):  # keeps insertion order (inserting_after would reverse it)
        parts, heads = [], []
        for h in range(H):
            a_h = g.call_function(aten.slice.Tensor, (a, -1, h * width, (h + 1) * width))
            heads.append(a_h)
            w_h = g.call_function(aten.slice.Tensor, (weight, 1, h * width, (h + 1) * width))
            p = g.call_function(aten.mul.Tensor, (g.call_function(aten.linear.default, (a_h, w_h)), H))
            # The bias is replicated: every group adds it, the mean keeps it once.
            parts.append(g.call_function(aten.add.Tensor, (p, bias)) if bias is not None else p)
        stacked = g.call_function(aten.stack.default, (parts, 0))
        mean = g.call_function(aten.mean.dim, (stacked, [0]))
    attn.group_heads = heads
    stacked.meta["val"] = val(o).new_empty(H, *val(o).shape)
    mean.meta["val"] = val(o)
    o.replace_all_uses_with(mean)
    g.erase_node(o)
    gm.meta[PARTIALS_KEY][mean] = stacked
