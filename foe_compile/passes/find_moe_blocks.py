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

import operator

from torch import fx

from .dense_experts import dense_weighted_input
from .expert_forms import FORMS, refresh_grouped_mm_ops
from .infra import PassResult, ancestors, aten, descendants, getitem_users, is_op
from .matches import MOE_KEY, UNTOUCHED_KEY, MoEMatch
from .moe_router import is_pick_router, match_router, routing_size
from .select_loop import select_loop
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
            if isinstance(match, MoEMatch):
                write = _write_through_alias(match, router[1] if router[1] is not None else node)
                if write is not None:
                    match = (f"{node.name}: {write.name} ({_op_name(write)}) writes in place into a tensor of the block "
                             "that other ops also read (the matchers follow values, not memory); left as written")
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
    for matcher in (*FORMS, select_loop, sort_split, dense_weighted_input):
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
        why = (f"the top-k is inside the attention module {attention} (attention heads as experts, or a "
               f"sparse-attention token selection; foe::experts_swiglu computes MLP experts); {why}")
    return f"{where}: {why}"


def _attention_module(node: fx.Node) -> str | None:
    """The path of the innermost module whose class is an attention module that `node` was traced in."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return next((path for path, cls in reversed(stack) if "Attention" in str(cls).rsplit(".", 1)[-1]), None)


# Ops whose output shares memory with their first input: a write into one is a write into the others.
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.alias.default, aten.slice.Tensor, aten.select.int,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
          aten.transpose.int, aten.permute.default, aten.t.default, aten.numpy_T.default, aten.as_strided.default,
          aten.diagonal.default, aten.view_as.default, aten.reshape.default, aten.flatten.using_ints,
          aten.unflatten.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
          aten.detach.default}
_MULTI_VIEWS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}


def _is_view(node: fx.Node) -> bool:
    """A view of its first input (an item of split / chunk / unbind is one; an output of topk is not)."""
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and node.args[0].target in _MULTI_VIEWS
    return node.target in _VIEWS


def _write_through_alias(match: MoEMatch, start: fx.Node) -> fx.Node | None:
    """An op writing in place into a tensor the block computes (from the router to the output), or into
    a view of one, while other ops read that memory after the write: the matchers reason about node
    values, so such a write (w.view(-1).masked_fill_(...), then w read) would be lost by the rewrite.
    Writes whose memory is read afterwards only through the writer's own result (w /= w.sum(),
    act(g).mul_(u), index_add_ into a fresh buffer) are what the matchers follow."""
    region = (descendants([start]) & (ancestors(match.output) | {match.output})) | {start}
    position = {n: i for i, n in enumerate(start.graph.nodes)}
    for node in region:
        aliases, frontier = {node}, [node]
        while frontier:
            frontier = [u for n in frontier for u in n.users if _is_view(u) and u not in aliases]
            aliases.update(frontier)
        readers = {u for a in aliases for u in a.users} - aliases
        for writer in (u for u in readers if any(u.args[i] in aliases for i in _written_args(u))):
            if any(position[r] > position[writer] for r in readers - {writer}):  # reads the memory after the write
                return writer
    return None


def _written_args(node: fx.Node) -> list[int]:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    return [i for i, arg in enumerate(schema.arguments[:len(node.args)])
            if arg.alias_info is not None and arg.alias_info.is_write]


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))
