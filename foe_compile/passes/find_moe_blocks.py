"""find_moe_blocks: locate MoE blocks in a pre-dispatch ATen graph (records, never rewrites).

Anchor: aten.topk of a router (moe_router.py: a linear scored by softmax, sigmoid or
sqrt(softplus) before the top-k, with an optional correction bias and group limit, or scored
over the k picked logits after it, is fused; other routers stay in the graph as written). From
there, one of the expert implementations of expert_forms.py must follow (transformers v5
grouped GEMMs, per-expert selection loops, per-expert dense mask loops), sort + split
(sort_split.py) or the dense form of dense_experts.py (every expert on every token, the routing
weight scaling its input), with an expert unit
foe::experts_swiglu computes (expert_unit.py). Every op that lowering would replace is checked:
the router's bias, softmax and top-k dims and `largest`; the expert unit, its biases and column
layout; that the expert outputs are multiplied exactly once, by the routing weights (or, in the dense
form, the inputs by a routing matrix that is exactly 0 off the picks). A block
that differs in any of these is left as written, with the reason recorded for the report.
"""
from __future__ import annotations

from torch import fx

from .dense_experts import dense_weighted_input
from .expert_forms import FORMS, refresh_grouped_mm_ops
from .infra import PassResult, ancestors, aten, getitem_users, is_op
from .matches import MOE_KEY, UNTOUCHED_KEY, MoEMatch
from .moe_router import is_pick_router, match_router, routing_size
from .sort_split import sort_split


def find_moe_blocks(gm: fx.GraphModule) -> PassResult:
    """Record every MoE block as a MoEMatch in gm.meta["foe_moe_blocks"], and every router whose
    block cannot be expressed exactly by the foe:: ops as (router node name, reason) in
    gm.meta["foe_untouched_blocks"]: those blocks are left as the source wrote them."""
    refresh_grouped_mm_ops()
    matches, untouched = [], {}
    for node in gm.graph.nodes:
        if is_op(node, aten.topk.default) or is_pick_router(node):  # moe_router.py: pick routers
            router = match_router(node)
            if router is None:
                continue
            if isinstance(router, str):  # routing stays in the graph; the experts may still be lowered
                router = (node, None, getitem_users(node)[1], None, None, False, router)
            match = _match_experts(*router)
            if isinstance(match, str):
                untouched[node] = ((router[1].args[1] if router[1] is not None else node).name, match)
            else:
                matches.append(match)
    # A top-k inside another block's routing (DeepSeek's group selection) is not a block of its own.
    routing = set().union(*(ancestors(m.ids) - ancestors(m.hidden) for m in matches))  # not earlier layers
    gm.meta[MOE_KEY] = matches
    gm.meta[UNTOUCHED_KEY] = [entry for topk, entry in untouched.items() if topk not in routing]
    return PassResult("find_moe_blocks", len(matches))


def _match_experts(topk, linear, ids, weights, variant, renormalize, graph_routing) -> MoEMatch | str:
    """The block's experts after a router; with graph routing (linear and weights None) the routing
    weights are whatever the experts are multiplied by, found from the experts' side."""
    top_k, num_experts = routing_size(topk)  # an aten.topk or a pick router's ids (moe_router.py)
    common = dict(router_input=linear.args[0] if linear is not None else None,
                  router_weight=linear.args[1] if linear is not None else None, ids=ids, weights=weights,
                  renormalize=renormalize, top_k=top_k, num_experts=num_experts)
    reasons = []
    for matcher in (*FORMS, sort_split, dense_weighted_input):
        match = matcher(common)
        if isinstance(match, MoEMatch):
            match.graph_routing, match.routing = graph_routing, variant or {}
            return match
        if match is not None:
            reasons.append(match)
    if linear is not None and not graph_routing:
        # The experts may be scaled by weights other than the router's (a routed scaling factor applied
        # after it): keep that routing in the graph and lower only the experts.
        rerouted = _match_experts(topk, None, ids, None, None, False,
                                  "routing weights are changed after the router (e.g. a routed scaling factor)")
        if isinstance(rerouted, MoEMatch):
            return rerouted
    why = "; ".join(reasons) or (
        "the expert computation matches none of the supported forms (transformers v5 grouped_mm; per-expert loops "
        "selecting tokens with one_hot/where/nonzero and combining with index_add_/scatter_add_/index_put_; "
        "per-expert dense mask loops; sort + split by per-expert counts; dense bmm experts weighting their input, "
        "as Llama 4)")
    where = f"router {linear.name} -> {topk.name}" if linear is not None else f"{topk.name} ({graph_routing})"
    attention = _attention_module(topk)
    if attention:
        why = (f"the router is inside the attention module {attention} (experts that are attention heads, a "
               f"mixture of attention: foe::experts_swiglu computes MLP experts); {why}")
    return f"{where}: {why}"


def _attention_module(node: fx.Node) -> str | None:
    """The path of the innermost module whose class is an attention module that `node` was traced in."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return next((path for path, cls in reversed(stack) if "Attention" in str(cls).rsplit(".", 1)[-1]), None)
