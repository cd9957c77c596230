"""Router matching for find_moe_blocks: which top-k is a router's, and whether foe::sum_route_dispatch
computes its routing exactly (else the routing stays in the graph as written, with the reason)."""
from __future__ import annotations

from torch import fx

from .infra import ancestors, aten, getitem_users, is_op, only_user, skip_pass_through, users, val

def is_last_dim(node: fx.Node, dim) -> bool:
    return dim in (-1, val(node).dim() - 1)


def match_router(topk: fx.Node):
    """(topk, linear, ids, weights, renormalize, None) for a router foe::sum_route_dispatch computes
    exactly; a reason (str) for a router it cannot; None when `topk` is not a router's.

    Two orders are exact: topk(softmax(linear(x))) [v / v.sum(-1)], and softmax(topk(linear(x)))
    (Mixtral's spelling: a softmax over the k picked logits is the renormalised softmax)."""
    if not isinstance(topk.args[1], int):
        return None  # a data-dependent k (a sparse-attention indexer's min(k, T)) is not a router's
    source = skip_pass_through(topk.args[0])
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    outs = getitem_users(topk)
    if 1 not in outs:
        return None
    if is_op(source, aten.softmax.int, aten._softmax.default):
        linear, order = skip_pass_through(source.args[0]), "softmax_topk"
        if not is_last_dim(source, source.args[1]):
            return f"router softmax over dim {source.args[1]}, not over the experts (last dim)"
    elif is_op(source, aten.linear.default):
        linear, order = source, "topk_softmax"
    else:
        return _other_router(source)
    if not is_op(linear, aten.linear.default):
        return None
    if not is_last_dim(topk.args[0], dim) or largest is False:
        return f"router top-k with dim={dim}, largest={largest} (foe::sum_route_dispatch picks the largest over experts)"
    if len(linear.args) > 2 and linear.args[2] is not None:
        return f"router {linear.name} has a bias (foe::sum_route_dispatch's router is bias-free)"
    if order == "softmax_topk":
        if 0 not in outs:
            return None
        weights, renormalize = _routing_weights(outs[0])
        return topk, linear, outs[1], weights, renormalize, None
    picked = outs[0].users if 0 in outs else []
    softmaxes = [u for u in picked if is_op(u, aten.softmax.int, aten._softmax.default)]
    if len(softmaxes) != 1 or not is_last_dim(softmaxes[0], softmaxes[0].args[1]):
        return f"router {linear.name}: top-k on logits without a softmax over the picks (fused op needs softmax)"
    weights = softmaxes[0]
    while (nxt := only_user(weights)) is not None and is_op(nxt, aten.to.dtype, aten._to_copy.default, aten.type_as.default):
        weights = nxt
    return topk, linear, outs[1], weights, True, None


def _other_router(scores: fx.Node) -> str | None:
    """Why a top-k over something other than softmax(linear) is not fused (None: not a router)."""
    if not any(is_op(a, aten.linear.default) for a in [scores, *ancestors(scores)]):
        return None
    kind = scores.target.__name__ if hasattr(scores.target, "__name__") else str(scores.target)
    return (f"router scores come from {kind} (foe::sum_route_dispatch fuses softmax scoring only); "
            "the block is left as written")


def _routing_weights(values: fx.Node) -> tuple[fx.Node, bool]:
    """Follow top-k values through an optional renormalisation (v / v.sum(-1)) and casts."""
    node, renormalize = values, False
    sums = users(values, aten.sum.dim_IntList)
    if len(sums) == 1 and list(sums[0].args[1]) in ([-1], [val(values).dim() - 1]):
        divs = [u for u in users(values, aten.div.Tensor, aten.div_.Tensor) if u.args[1] is sums[0]]
        if len(divs) == 1:
            node, renormalize = divs[0], True
    while (nxt := only_user(node)) is not None and is_op(nxt, aten.to.dtype, aten._to_copy.default):
        node = nxt
    return node, renormalize
