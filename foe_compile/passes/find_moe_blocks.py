"""find_moe_blocks: locate MoE blocks in a pre-dispatch ATen graph (records, never rewrites).

Anchor: aten.topk over aten.softmax of an aten.linear router. From there, one of three expert
implementations must follow, or the block is reported as unrecognised:
  grouped_mm      transformers v5: sort ids -> gather -> grouped_mm (gate_up) -> SwiGLU ->
                  grouped_mm (down) -> weight -> unsort -> sum over k
  index_add_loop  v4 style: one_hot -> per expert where() -> SwiGLU -> weight -> index_add_
  dense_loop      a user block: per expert (weights * (ids == e)).sum(-1) * SwiGLU_e(x), summed
"""
from __future__ import annotations

import torch
from torch import fx

from .infra import (PassResult, ancestors, aten, descendants, getitem_users, is_op, only_user, skip_pass_through,
                    users, val)
from .matches import MOE_KEY, MoEMatch

GROUPED_MM: tuple = (torch.ops.aten._grouped_mm.default,) if hasattr(torch.ops.aten, "_grouped_mm") else ()


class UnrecognisedMoE(ValueError):
    """A router + top-k was found but the experts that follow match no known pattern."""


def find_moe_blocks(gm: fx.GraphModule) -> PassResult:
    """Record every MoE block as a MoEMatch in gm.meta["foe_moe_blocks"]."""
    _refresh_grouped_mm_ops()
    matches = []
    for node in gm.graph.nodes:
        if is_op(node, aten.topk.default):
            router = _match_router(node)
            if router is not None:
                matches.append(_match_experts(*router))
    gm.meta[MOE_KEY] = matches
    return PassResult("find_moe_blocks", len(matches))


def _refresh_grouped_mm_ops() -> None:
    # transformers registers its fallback op lazily; pick it up if it appeared since import.
    global GROUPED_MM
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None and fallback.default not in GROUPED_MM:
        GROUPED_MM = GROUPED_MM + (fallback.default,)


def _match_router(topk: fx.Node):
    softmax = skip_pass_through(topk.args[0])
    if not is_op(softmax, aten.softmax.int, aten._softmax.default) or softmax.args[1] not in (-1, 1):
        return None
    linear = skip_pass_through(softmax.args[0])
    if not is_op(linear, aten.linear.default) or len(linear.args) > 2 and linear.args[2] is not None:
        return None
    outs = getitem_users(topk)
    if 0 not in outs or 1 not in outs:
        return None
    weights, renormalize = _routing_weights(outs[0])
    return topk, linear, outs[1], weights, renormalize


def _routing_weights(values: fx.Node) -> tuple[fx.Node, bool]:
    """Follow top-k values through an optional renormalisation (v / v.sum(-1)) and casts."""
    node, renormalize = values, False
    sums = users(values, aten.sum.dim_IntList)
    if len(sums) == 1:
        divs = [u for u in users(values, aten.div.Tensor, aten.div_.Tensor) if u.args[1] is sums[0]]
        if len(divs) == 1:
            node, renormalize = divs[0], True
    while (nxt := only_user(node)) is not None and is_op(nxt, aten.to.dtype, aten._to_copy.default):
        node = nxt
    return node, renormalize


def _match_experts(topk, linear, ids, weights, renormalize) -> MoEMatch:
    common = dict(router_input=linear.args[0], router_weight=linear.args[1], ids=ids, weights=weights,
                  renormalize=renormalize, top_k=int(topk.args[1]), num_experts=val(linear.args[1]).shape[0])
    for matcher in (_grouped_mm, _dense_loop, _index_add_loop):
        match = matcher(common)
        if match is not None:
            return match
    raise UnrecognisedMoE(
        f"found a router ({linear.name}: linear -> softmax -> {topk.name}: topk) but the expert computation "
        f"after {ids.name} matches none of the supported patterns (transformers v5 grouped_mm, v4-style "
        "per-expert index_add_ loop, per-expert dense mask loop); see foe_compile/passes/find_moe_blocks.py"
    )


def _internal(roots, output: fx.Node) -> set[fx.Node]:
    """Nodes between the routing outputs and the block output, plus the dead branches hanging off
    them (in-place ops, runtime size asserts) that DCE keeps but lowering must remove."""
    below = descendants(roots)
    core = below & (ancestors(output) | {output})
    hanging: set[fx.Node] = set()
    grew = True
    while grew:
        grew = False
        for n in below - core - hanging:
            inputs = [i for i in n.all_input_nodes if i in below]
            if output not in n.all_input_nodes and all(i in core or i in hanging for i in inputs):
                hanging.add(n)
                grew = True
    return core | hanging


def _grouped_mm(c: dict) -> MoEMatch | None:
    # ids -> reshape -> sort -> (sorted ids -> histc -> cumsum = offsets, order -> gather rows)
    flat = [u for u in c["ids"].users if is_op(u, aten.reshape.default, aten.view.default)]
    sorts = [s for f in flat for s in users(f, aten.sort.default, aten.sort.stable)]
    if len(sorts) != 1:
        return None
    outs = getitem_users(sorts[0])
    offsets = [n for n in _nearest(outs.get(0), lambda n: is_op(n, aten.cumsum.default), limit=4)]
    mms = _in_graph_order(u for o in offsets for u in users(o, *GROUPED_MM))
    gathers = [g for d in users(outs.get(1), aten.floor_divide.default) for g in users(d, aten.index.Tensor)]
    if len(mms) != 2 or len(gathers) != 1:
        return None
    sums = _nearest(mms[1], lambda n: is_op(n, aten.sum.dim_IntList) and list(n.args[1]) == [1], limit=8)
    if len(sums) != 1:
        return None
    output = sums[0]
    while (nxt := only_user(output)) is not None and is_op(nxt, aten.to.dtype, aten.reshape.default, aten.view.default):
        output = nxt
    weight = lambda mm: skip_pass_through(mm.args[1].args[0] if is_op(mm.args[1], aten.transpose.int)  # noqa: E731
                                          else mm.args[1])
    return MoEMatch("grouped_mm", hidden=gathers[0].args[0], output=output, gate_up=weight(mms[0]),
                    down=weight(mms[1]), internal=_internal([c["ids"], c["weights"]], output), **c)


def _nearest(start: fx.Node | None, predicate, limit: int) -> list[fx.Node]:
    """Nodes satisfying `predicate` at the smallest depth (<= limit) below `start`."""
    frontier = [start] if start is not None else []
    for _ in range(limit):
        frontier = list({u for n in frontier for u in n.users})
        found = [n for n in frontier if predicate(n)]
        if found:
            return found
    return []


def match_swiglu(down_linear: fx.Node):
    """linear(silu(linear(x, Wg)) * linear(x, Wu), Wd) -> (x, Wg, Wu, Wd) or None."""
    if not is_op(down_linear, aten.linear.default):
        return None
    h = down_linear.args[0]
    if not is_op(h, aten.mul.Tensor):
        return None
    a, b = h.args
    silu, up = (a, b) if is_op(a, aten.silu.default) else (b, a)
    if not is_op(silu, aten.silu.default) or not is_op(up, aten.linear.default):
        return None
    gate = silu.args[0]
    if not is_op(gate, aten.linear.default) or gate.args[0] is not up.args[0]:
        return None
    return gate.args[0], gate.args[1], up.args[1], down_linear.args[1]


def _dense_loop(c: dict) -> MoEMatch | None:
    E, ids, weights = c["num_experts"], c["ids"], c["weights"]
    eqs = {int(u.args[1]): u for u in users(ids, aten.eq.Scalar)}
    if sorted(eqs) != list(range(E)):
        return None
    terms, per_expert, hidden = [], [], None
    for e in range(E):
        mask_mul = next((u for u in users(eqs[e], aten.mul.Tensor) if weights in u.args), None)
        gate = only_user(mask_mul) if mask_mul is not None else None
        scale = only_user(gate) if is_op(gate, aten.sum.dim_IntList) else None
        if not is_op(scale, aten.mul.Tensor):
            return None
        y = scale.args[1] if scale.args[0] is gate else scale.args[0]
        swiglu = match_swiglu(y)
        if swiglu is None or (hidden is not None and swiglu[0] is not hidden):
            return None
        hidden = swiglu[0]
        per_expert.append(swiglu[1:])
        terms.append(scale)
    output = _sum_chain(terms)
    if output is None:
        return None
    # The experts read only `hidden`: their nodes are the output's ancestors that are not the
    # input's or the router's.
    outside = ancestors(hidden) | ancestors(ids) | ancestors(weights) | {hidden, ids, weights}
    return MoEMatch("dense_loop", hidden=hidden, output=output, per_expert=per_expert,
                    internal=_internal([ids, weights], output) | (ancestors(output) - outside), **c)


def _sum_chain(terms: list[fx.Node]) -> fx.Node | None:
    """The last add of a chain acc = acc + term that consumes every term exactly once."""
    pending, node = set(terms), None
    acc = next((u for u in terms[0].users if is_op(u, aten.add.Tensor)), None)
    while is_op(acc, aten.add.Tensor) and pending & set(acc.args):
        pending -= set(acc.args)
        node, acc = acc, only_user(acc)
    return node if not pending else None


def _index_add_loop(c: dict) -> MoEMatch | None:
    ids = c["ids"]
    one_hot = users(ids, aten.one_hot.default)
    if len(one_hot) != 1:
        return None
    # one_hot [T, k, E] -> permute -> select(e) -> where -> (slot, token) -> index_add_(out, 0, token, y)
    masks = [u for u in one_hot[0].users if is_op(u, aten.permute.default)]
    selects = users(masks[0], aten.select.int) if len(masks) == 1 else []
    wheres = [w for s in selects for w in users(s, aten.where.default, aten.nonzero_numpy.default)]
    tokens = [getitem_users(w).get(1) for w in wheres]
    adds = _in_graph_order(a for t in tokens if t is not None
                           for a in users(t, aten.index_add_.default, aten.index_add.default) if a.args[2] is t)
    if len(adds) != c["num_experts"]:
        return None
    per_expert, hidden = [], None
    for add in adds:
        scaled = skip_pass_through(add.args[3])  # expert(x[token]) * weights[token, slot]
        swiglu = next((s for s in map(match_swiglu, scaled.args) if s), None) if is_op(scaled, aten.mul.Tensor) else None
        if swiglu is None or not is_op(swiglu[0], aten.index.Tensor):
            return None
        source = swiglu[0].args[0]  # the rows are gathered from the block's input
        if hidden is not None and source is not hidden:
            return None
        hidden = source
        per_expert.append(swiglu[1:])
    output = adds[-1]
    while (nxt := only_user(output)) is not None and is_op(nxt, aten.reshape.default, aten.view.default):
        output = nxt
    return MoEMatch("index_add_loop", hidden=hidden, output=output, per_expert=per_expert,
                    internal=_internal([ids, c["weights"]], output) | set(adds), **c)


def _in_graph_order(nodes) -> list[fx.Node]:
    nodes = set(nodes)
    return [n for n in next(iter(nodes)).graph.nodes if n in nodes] if nodes else []
