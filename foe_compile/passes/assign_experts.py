"""assign_experts (FoE form, non-contiguous assignment): which experts each group owns.

Group h owns positions [h*E/H, (h+1)*E/H) of a block's expert order; a permutation `perm`
(position j holds source expert perm[j]) moves the router rows and the experts with it, so
only the grouping, and with it quota routing, changes. Runs after lower_experts, when only
foe::sum_route_dispatch (router rows) and foe::experts_swiglu (expert weights) read them;
the source's own router (e.g. a router-logits output) is left as it was. Weights held by the
module (get_attr) become permuted copies registered on the GraphModule; per-expert weights
stacked in the graph are stacked in the new order (no copy); other weights computed in the graph
(read through a transpose, columns reordered) are reordered there by an index_select.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .infra import PassResult, aten, is_op, val
from .matches import MOE_KEY


def assign_experts(gm: fx.GraphModule, perms: list[list[int]] | None) -> PassResult:
    blocks = gm.meta.get(MOE_KEY, [])
    if perms is None:
        return PassResult("assign_experts", 0)
    if len(perms) != len(blocks):
        raise ValueError(f"got {len(perms)} expert assignments for {len(blocks)} MoE blocks")
    moved = 0
    for i, (block, perm) in enumerate(zip(blocks, perms)):
        if perm == list(range(block.num_experts)):
            continue
        if block.route is None or block.group_partials is None:
            raise ValueError(f"MoE block {i} was not fused and lowered; an expert assignment needs both")
        experts = block.group_partials
        for arg, what in ((4, "router"), (9, "router_bias"), (10, "correction_bias")):
            if len(block.route.args) > arg and block.route.args[arg] is not None:
                block.route.update_arg(arg, _permuted(gm, block.route.args[arg], perm, f"{what}_{i}"))
        for arg, what in ((1, "gate_up"), (2, "down"), (9, "gate_up_bias"), (10, "down_bias")):
            if len(experts.args) > arg and experts.args[arg] is not None:
                experts.update_arg(arg, _permuted(gm, experts.args[arg], perm, f"{what}_{i}"))
        moved += 1
    return PassResult("assign_experts", moved)


def _permuted(gm: fx.GraphModule, node: fx.Node, perm: list[int], name: str) -> fx.Node:
    """`node`'s rows in `perm` order: a reordered stack, or a permuted copy of a module weight."""
    if is_op(node, aten.stack.default) and len(node.args[0]) == len(perm):
        node.update_arg(0, [node.args[0][p] for p in perm])
        return node
    if node.op != "get_attr":  # computed in the graph (a transpose, a reordering of columns): reorder there
        order = f"foe_assigned_{name}_order"
        gm.register_buffer(order, torch.tensor(perm, device=val(node).device))
        with gm.graph.inserting_after(node):
            index = gm.graph.get_attr(order)
        with gm.graph.inserting_after(index):
            permuted = gm.graph.call_function(aten.index_select.default, (node, 0, index))
        permuted.meta["val"] = val(node)
        return permuted
    weight = operator.attrgetter(node.target)(gm)
    target = f"foe_assigned_{name}"
    gm.register_parameter(target, nn.Parameter(weight.detach()[torch.tensor(perm)], requires_grad=False))
    with gm.graph.inserting_before(node):
        permuted = gm.graph.get_attr(target)
    permuted.meta = dict(node.meta)
    return permuted

