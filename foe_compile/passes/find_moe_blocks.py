"""find_moe_blocks: locate MoE blocks in a pre-dispatch ATen graph (records, never rewrites).

Anchor: aten.topk of a router (a bias-free aten.linear), scored by softmax before the top-k or
over the k picked logits after it. From there, one of three expert implementations must follow:
  grouped_mm   transformers v5: sort ids -> gather -> grouped_mm (gate_up) -> SwiGLU ->
               grouped_mm (down) -> weight -> unsort -> sum over k
  select_loop  per expert: pick its (token, slot) pairs (one_hot + where, where(ids == e),
               nonzero) -> SwiGLU on x[token] -> * weights[token, slot] -> index_add_ /
               scatter_add_ / index_put_(accumulate=True)
  dense_loop   per expert (weights * (ids == e)).sum(-1) * SwiGLU_e(x), summed
Every op that lowering would replace is checked: the router's bias, softmax and top-k dims and
`largest`; the expert unit (silu on the gate half, no biases); that the expert outputs are
multiplied exactly once, by the routing weights the router produced. A block that differs in
any of these is left as written, with the reason recorded for the report.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .infra import (PASS_THROUGH, PassResult, ancestors, aten, descendants, getitem_users, is_op, only_user,
                    skip_pass_through, users, val)
from .matches import MOE_KEY, UNTOUCHED_KEY, MoEMatch
from .moe_router import is_last_dim, match_router

GROUPED_MM: tuple = (torch.ops.aten._grouped_mm.default,) if hasattr(torch.ops.aten, "_grouped_mm") else ()


def find_moe_blocks(gm: fx.GraphModule) -> PassResult:
    """Record every MoE block as a MoEMatch in gm.meta["foe_moe_blocks"], and every router whose
    block cannot be expressed exactly by the foe:: ops as (router node name, reason) in
    gm.meta["foe_untouched_blocks"]: those blocks are left as the source wrote them."""
    _refresh_grouped_mm_ops()
    matches, untouched = [], {}
    for node in gm.graph.nodes:
        if is_op(node, aten.topk.default):
            router = match_router(node)
            if router is None:
                continue
            if isinstance(router, str):  # routing stays in the graph; the experts may still be lowered
                router = (node, None, getitem_users(node)[1], None, False, router)
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


def _refresh_grouped_mm_ops() -> None:
    # transformers registers its fallback op lazily; pick it up if it appeared since import.
    global GROUPED_MM
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None and fallback.default not in GROUPED_MM:
        GROUPED_MM = GROUPED_MM + (fallback.default,)


def _match_experts(topk, linear, ids, weights, renormalize, graph_routing) -> MoEMatch | str:
    """The block's experts after a router; with graph routing (linear and weights None) the routing
    weights are whatever the experts are multiplied by, found from the experts' side."""
    common = dict(router_input=linear.args[0] if linear is not None else None,
                  router_weight=linear.args[1] if linear is not None else None, ids=ids, weights=weights,
                  renormalize=renormalize, top_k=int(topk.args[1]), num_experts=val(topk.args[0]).shape[-1])
    reasons = []
    for matcher in (_grouped_mm, _dense_loop, _select_loop):
        match = matcher(common)
        if isinstance(match, MoEMatch):
            match.graph_routing = graph_routing
            return match
        if match is not None:
            reasons.append(match)
    if linear is not None and not graph_routing:
        # The experts may be scaled by weights other than the router's (a routed scaling factor applied
        # after it): keep that routing in the graph and lower only the experts.
        rerouted = _match_experts(topk, None, ids, None, False,
                                  "routing weights are changed after the router (e.g. a routed scaling factor)")
        if isinstance(rerouted, MoEMatch):
            return rerouted
    why = "; ".join(reasons) or (
        "the expert computation matches none of the supported forms (transformers v5 grouped_mm; per-expert loops "
        "selecting tokens with one_hot/where/nonzero and combining with index_add_/scatter_add_/index_put_; "
        "per-expert dense mask loops)")
    where = f"router {linear.name} -> {topk.name}" if linear is not None else f"{topk.name} ({graph_routing})"
    return f"{where}: {why}"


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


def _grouped_mm(c: dict) -> MoEMatch | str | None:
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
    why = _check_grouped_unit(mms[0], mms[1])
    if why:
        return why
    weights = _weighting(mms[1], output, c["weights"], c["ids"])
    if isinstance(weights, str):
        return weights
    c = {**c, "weights": weights}
    weight = lambda mm: skip_pass_through(mm.args[1].args[0] if is_op(mm.args[1], aten.transpose.int)  # noqa: E731
                                          else mm.args[1])
    return MoEMatch("grouped_mm", hidden=gathers[0].args[0], output=output, gate_up=weight(mms[0]),
                    down=weight(mms[1]), internal=_internal([c["ids"], c["weights"]], output), **c)


# Ops allowed between the two grouped GEMMs (a SwiGLU) and after the second (weighting, unsorting).
_UNIT_OPS = (aten.masked_fill.Scalar, aten.masked_fill_.Scalar, aten.chunk.default, aten.split.Tensor,
             aten.silu.default, aten.mul.Tensor) + PASS_THROUGH
_COMBINE_OPS = (aten.masked_fill.Scalar, aten.masked_fill_.Scalar, aten.mul.Tensor, aten.index.Tensor,
                aten.unsqueeze.default, aten.sum.dim_IntList) + PASS_THROUGH


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _check_grouped_unit(mm0: fx.Node, mm1: fx.Node) -> str | None:
    """None when the nodes from the gate_up GEMM to the down GEMM are silu(gate) * up, gate first,
    and neither GEMM has a bias; else what differs."""
    for mm in (mm0, mm1):
        if len(mm.args) > 3 and mm.args[3] is not None or mm.kwargs.get("bias") is not None:
            return f"expert GEMM {mm.name} adds a bias (foe::experts_swiglu has no expert biases)"
    path = descendants([mm0]) & ancestors(mm1)
    foreign = [n for n in path if n.op == "call_function" and n.target is not operator.getitem
               and not is_op(n, *_UNIT_OPS)]
    if foreign:
        return (f"expert unit computes {_name(foreign[0])} ({foreign[0].name}) between the grouped GEMMs; "
                "foe::experts_swiglu computes silu(gate) * up")
    silus = [n for n in path if is_op(n, aten.silu.default)]
    muls = [n for n in path if is_op(n, aten.mul.Tensor)]
    if len(silus) != 1 or len(muls) != 1 or silus[0] not in muls[0].args:
        return "expert unit is not silu(gate) * up (foe::experts_swiglu's SwiGLU)"
    up = muls[0].args[1] if muls[0].args[0] is silus[0] else muls[0].args[0]
    if _half(silus[0].args[0]) != 0 or _half(up) != 1:
        return "expert unit applies silu to the second half of gate_up (the experts op expects gate rows first)"
    return None


def _half(node) -> int | None:
    """0 or 1 for the first / second half of a chunk(2, -1) or split(I, -1) of the gate_up output."""
    if not (isinstance(node, fx.Node) and node.target is operator.getitem):
        return None
    parent = node.args[0]
    if is_op(parent, aten.chunk.default) and parent.args[1] == 2 and is_last_dim(parent.args[0], parent.args[2]):
        return node.args[1]
    if is_op(parent, aten.split.Tensor) and is_last_dim(parent.args[0], parent.args[2] if len(parent.args) > 2 else 0):
        width = val(parent.args[0]).shape[-1]
        return node.args[1] if parent.args[1] * 2 == width else None
    return None


def _weighting(mm1: fx.Node, output: fx.Node, weights: fx.Node | None, ids: fx.Node) -> fx.Node | str:
    """The routing weights [..., k] when the down GEMM's rows are multiplied once by them and summed
    back per token (with a fused router: exactly the weights it produced); else what differs."""
    path = (descendants([mm1]) & (ancestors(output) | {output})) - {output}
    foreign = [n for n in path if n.op == "call_function" and not is_op(n, *_COMBINE_OPS)]
    if foreign:
        return f"expert outputs go through {_name(foreign[0])} ({foreign[0].name}) before the combine"
    muls = [n for n in path if is_op(n, aten.mul.Tensor)]
    if len(muls) != 1:
        return f"expert outputs are multiplied {len(muls)} times before the combine (expected: once, by the weights)"
    other = [a for a in muls[0].args if isinstance(a, fx.Node) and a not in path and a is not mm1]
    return _same_weights(other[0] if len(other) == 1 else None, weights, ids)


def _same_weights(factor: fx.Node | None, weights: fx.Node | None, ids: fx.Node) -> fx.Node | str:
    """`weights` when the expert outputs' factor is those weights (gathered or viewed); with graph
    routing (weights None), the factor's source when it is a per-pick tensor shaped like ids."""
    source = _weights_source(factor) if factor is not None else None
    if weights is not None:
        if source is not None and source is skip_pass_through(weights):
            return weights
    elif source is not None and val(source).shape == val(ids).shape:
        return source
    return ("expert outputs are scaled by something other than the routing weights (a routed scaling "
            "factor or per-expert scale the fused op does not apply)")


def _weights_source(node: fx.Node) -> fx.Node:
    """The routing-weights node behind views, casts, unsqueezes and gathers (w[perm], w[token, slot])."""
    while True:
        node = skip_pass_through(node)
        if is_op(node, aten.unsqueeze.default, aten.index.Tensor, aten.select.int, aten.expand.default):
            node = node.args[0]
        else:
            return node


def _nearest(start: fx.Node | None, predicate, limit: int) -> list[fx.Node]:
    """Nodes satisfying `predicate` at the smallest depth (<= limit) below `start`."""
    frontier = [start] if start is not None else []
    for _ in range(limit):
        frontier = list({u for n in frontier for u in n.users})
        found = [n for n in frontier if predicate(n)]
        if found:
            return found
    return []


def _bias_free_linear(node) -> bool:
    return is_op(node, aten.linear.default) and (len(node.args) < 3 or node.args[2] is None)


def match_swiglu(down_linear: fx.Node):
    """linear(silu(linear(x, Wg)) * linear(x, Wu), Wd) -> (x, Wg, Wu, Wd), all bias-free, else None."""
    if not _bias_free_linear(down_linear):
        return None
    h = down_linear.args[0]
    if not is_op(h, aten.mul.Tensor):
        return None
    a, b = h.args
    silu, up = (a, b) if is_op(a, aten.silu.default) else (b, a)
    if not is_op(silu, aten.silu.default) or not _bias_free_linear(up):
        return None
    gate = silu.args[0]
    if not _bias_free_linear(gate) or gate.args[0] is not up.args[0]:
        return None
    return gate.args[0], gate.args[1], up.args[1], down_linear.args[1]


def _unit_reason(down: fx.Node) -> str:
    """Why the expert unit ending in `down` is not a bias-free SwiGLU (for the report)."""
    acts = sorted({_name(n) for n in ancestors(down) | {down}
                   if is_op(n, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
                            aten.clamp.default, aten.square.default, aten.pow.Tensor_Scalar)})
    if acts:
        return f"expert unit uses {', '.join(acts)}; foe::experts_swiglu computes silu(gate) * up"
    return "expert unit is not a bias-free linear(silu(linear(x)) * linear(x)) (foe::experts_swiglu's SwiGLU)"


def _dense_loop(c: dict) -> MoEMatch | str | None:
    E, ids, weights = c["num_experts"], c["ids"], c["weights"]
    if weights is None:
        return None
    eqs = {int(u.args[1]): u for u in users(ids, aten.eq.Scalar)}
    if sorted(eqs) != list(range(E)):
        return None
    terms, per_expert, hidden = [], [], None
    for e in range(E):
        mask_mul = next((u for u in users(eqs[e], aten.mul.Tensor) if weights in u.args), None)
        gate = only_user(mask_mul) if mask_mul is not None else None
        scale = only_user(gate) if is_op(gate, aten.sum.dim_IntList) else None
        if not is_op(scale, aten.mul.Tensor) or not is_last_dim(mask_mul, gate.args[1][0]):
            return None
        y = scale.args[1] if scale.args[0] is gate else scale.args[0]
        swiglu = match_swiglu(y)
        if swiglu is None:
            return _unit_reason(y)
        if hidden is not None and swiglu[0] is not hidden:
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


# Ways a per-expert loop combines expert e's rows back into the output: (op, index arg, value arg).
_COMBINES = {aten.index_add_.default: (2, 3), aten.index_add.default: (2, 3),
             aten.scatter_add_.default: (2, 3), aten.scatter_add.default: (2, 3),
             aten.index_put_.default: (1, 2), aten.index_put.default: (1, 2)}


def _select_loop(c: dict) -> MoEMatch | str | None:
    """A per-expert loop: for e, select the (token, slot) pairs routed to e (one_hot + where,
    where(ids == e), nonzero(ids == e)), run expert e on x[token], multiply by weights[token, slot]
    and combine into the output with index_add_, scatter_add_ or index_put_(accumulate=True)."""
    E, ids, weights = c["num_experts"], c["ids"], c["weights"]
    combines = _in_graph_order(n for n in descendants([ids]) if is_op(n, *_COMBINES)
                               and _selected_expert(_combine_index(n), ids, E) is not None)
    if len(combines) != E:
        return None
    per_expert, hidden, seen = [None] * E, None, set()
    for node in combines:
        _, value_pos = _COMBINES[node.target]
        if node.target in (aten.index_put_.default, aten.index_put.default):
            accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
            if not accumulate or len(node.args[1]) != 1:
                return "per-expert combine by index_put_ without accumulate=True overwrites rows"
        elif node.args[1] not in (0, -val(node).dim()):
            return None
        index = _combine_index(node)
        scaled = skip_pass_through(node.args[value_pos])
        if is_op(scaled, aten.expand.default):
            scaled = skip_pass_through(scaled.args[0])
        if not is_op(scaled, aten.mul.Tensor):
            return "per-expert outputs are combined without being multiplied by their routing weights"
        found = [(s, o) for s, o in (scaled.args, scaled.args[::-1]) if isinstance(s, fx.Node) and match_swiglu(s)]
        if not found:
            down = next((a for a in scaled.args if is_op(a, aten.linear.default)), None)
            return _unit_reason(down) if down is not None else None
        unit, w = found[0]
        weights = _same_weights(w, weights, ids)
        if isinstance(weights, str):
            return "per-" + weights
        x, *params = match_swiglu(unit)
        if not is_op(x, aten.index.Tensor):
            return None
        e = _selected_expert(x.args[1][0], ids, E)
        if e is None or not 0 <= e < E or e in seen or _token_source(index) is not _token_source(x.args[1][0]):
            return None
        seen.add(e)
        if hidden is not None and x.args[0] is not hidden:
            return None
        hidden = x.args[0]
        per_expert[e] = tuple(params)
    output = combines[-1]
    while (nxt := only_user(output)) is not None and is_op(nxt, aten.reshape.default, aten.view.default):
        output = nxt
    return MoEMatch("select_loop", hidden=hidden, output=output, per_expert=per_expert,
                    internal=_internal([ids, weights], output) | set(combines), **{**c, "weights": weights})


def _combine_index(node: fx.Node):
    """The token-index argument of a combine op (index_put_ takes a list of one)."""
    index = node.args[_COMBINES[node.target][0]]
    return _token_source(index[0] if isinstance(index, (list, tuple)) else index)


def _token_source(node: fx.Node) -> fx.Node:
    """The token-index tensor behind views and expands (scatter_add_ indexes with token[:, None].expand)."""
    while True:
        node = skip_pass_through(node)
        if is_op(node, aten.expand.default, aten.unsqueeze.default):
            node = node.args[0]
        else:
            return node


_SELECTION_OPS = (aten.where.default, aten.nonzero.default, aten.nonzero_numpy.default, aten.select.int,
                  aten.slice.Tensor, aten.squeeze.dim, aten.squeeze.default, aten.unbind.int) + PASS_THROUGH


def _selected_expert(token: fx.Node, ids: fx.Node, num_experts: int) -> int | None:
    """e when `token` holds the token indices of the picks of expert e: walking up only through
    selection ops (where, nonzero, their columns) to eq(ids, e) or one_hot(ids).permute(...)[e]."""
    stack, seen = [token], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if is_op(n, aten.eq.Scalar) and skip_pass_through(n.args[0]) is ids:
            return int(n.args[1])
        if is_op(n, aten.select.int) and is_op(skip_pass_through(n.args[0]), aten.permute.default):
            one_hot = skip_pass_through(skip_pass_through(n.args[0]).args[0])
            if is_op(one_hot, aten.one_hot.default) and one_hot.args[0] is ids:
                return int(n.args[2])
        if n.target is operator.getitem or is_op(n, *_SELECTION_OPS):
            stack.append(n.args[0])
    return None


def _in_graph_order(nodes) -> list[fx.Node]:
    nodes = set(nodes)
    return [n for n in next(iter(nodes)).graph.nodes if n in nodes] if nodes else []
