"""find_gqa_attention: locate grouped-query attention (records, never rewrites).

Anchor: aten.scaled_dot_product_attention, or eager attention spelled out as
matmul(softmax(matmul(q, k^T) * scale + mask [, sinks]), v) (transformers' eager_attention_forward,
which gpt-oss's attention sinks and several sliding-window families use). Its q, k and v must each
come from an aten.linear projection (through views, q/k norms, RoPE and the repeat of KV heads),
and its output must reach an aten.linear o_proj through views only.
"""
from __future__ import annotations

from torch import fx

from .infra import PASS_THROUGH, PassResult, aten, is_op, only_user, val
from .matches import ATTENTION_KEY, AttentionMatch


def find_gqa_attention(gm: fx.GraphModule) -> PassResult:
    matches = []
    for node in gm.graph.nodes:
        qkv = node.args[:3] if is_op(node, aten.scaled_dot_product_attention.default) else _eager_qkv(node)
        match = _match(node, qkv) if qkv else None
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


# Between the attention probabilities and the scores: scale, mask, sinks (cat, then a slice of the
# probabilities), the max subtraction of a stable softmax, dropout (p = 0 in eval) and casts.
_SCORE_OPS = (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.cat.default,
              aten.slice.Tensor, aten.dropout.default) + PASS_THROUGH


def _eager_qkv(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(q, k, v) when `node` is matmul(softmax(scores over the last dim), v) with scores = matmul(q, k^T)."""
    if not is_op(node, aten.matmul.default) or val(node).dim() != 4:
        return None
    probs = node.args[0]
    while is_op(probs, aten.slice.Tensor, aten.dropout.default, *PASS_THROUGH):
        probs = probs.args[0]
    if not is_op(probs, aten.softmax.int, aten._softmax.default) or probs.args[1] not in (-1, 3):
        return None
    frontier, scores = [probs.args[0]], None
    while frontier and scores is None:  # the nearest q @ k^T above the softmax, through score ops only
        n = frontier.pop()
        if is_op(n, aten.matmul.default):
            scores = n
        elif is_op(n, *_SCORE_OPS):
            frontier += [a for a in n.all_input_nodes if a in n.args[:2] or a in (n.args[0] if is_op(n, aten.cat.default)
                                                                                   else ())]
    if scores is None or not is_op(scores.args[1], aten.transpose.int):
        return None
    return scores.args[0], scores.args[1].args[0], node.args[1]


def _match(sdpa: fx.Node, qkv) -> AttentionMatch | None:
    """`sdpa`: the attention's output node (SDPA or the eager probabilities @ v)."""
    q, k, v = (_projection(a) for a in qkv)
    out = only_user(sdpa)
    while out is not None and is_op(out, aten.transpose.int, *PASS_THROUGH):
        out = only_user(out)
    if None in (q, k, v) or not is_op(out, aten.linear.default) or len({q, k, v}) != 3:
        return None
    heads, head_dim = val(sdpa).shape[1], val(sdpa).shape[-1]
    kv_heads = val(k).shape[-1] // head_dim
    if heads % kv_heads or val(q).shape[-1] != heads * head_dim:
        return None
    return AttentionMatch(sdpa, q, k, v, out, heads, kv_heads, head_dim)
