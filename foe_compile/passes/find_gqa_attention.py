"""find_gqa_attention: locate grouped-query attention (records, never rewrites).

Anchor: aten.scaled_dot_product_attention. Its q, k and v must each come from an aten.linear
projection (through views, q/k norms, RoPE and the repeat of KV heads), and its output must
reach an aten.linear o_proj through views only.
"""
from __future__ import annotations

from torch import fx

from .infra import PASS_THROUGH, PassResult, aten, is_op, only_user, val
from .matches import ATTENTION_KEY, AttentionMatch


def find_gqa_attention(gm: fx.GraphModule) -> PassResult:
    matches = []
    for node in gm.graph.nodes:
        if is_op(node, aten.scaled_dot_product_attention.default):
            match = _match(node)
            if match is not None:
                matches.append(match)
    gm.meta[ATTENTION_KEY] = matches
    return PassResult("find_gqa_attention", len(matches))


def _projection(node: fx.Node, limit: int = 24) -> fx.Node | None:
    """The nearest aten.linear above `node` (breadth first, through any op)."""
    frontier, seen = [node], {node}
    for _ in range(limit):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen and not seen.add(a)]
        found = [n for n in frontier if is_op(n, aten.linear.default)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            return None
    return None


def _match(sdpa: fx.Node) -> AttentionMatch | None:
    q, k, v = (_projection(a) for a in sdpa.args[:3])
    out = only_user(sdpa)
    while out is not None and is_op(out, aten.transpose.int, *PASS_THROUGH):
        out = only_user(out)
    if None in (q, k, v) or not is_op(out, aten.linear.default) or len({q, k, v}) != 3:
        return None
    heads, head_dim = val(sdpa.args[0]).shape[1], val(sdpa.args[0]).shape[-1]
    kv_heads = val(k).shape[-1] // head_dim
    if heads % kv_heads or val(q).shape[-1] != heads * head_dim:
        return None
    return AttentionMatch(sdpa, q, k, v, out, heads, kv_heads, head_dim)
