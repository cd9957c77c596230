"""Two of the expert implementations find_moe_blocks recognises after a router.

  grouped_mm   transformers v5: sort ids -> gather -> grouped GEMM (gate_up, + bias[ids]) -> unit ->
               grouped GEMM (down, + bias[ids]) -> weight -> unsort -> sum over k
  select_loop  per-expert token selection loops: select_loop.py
  dense_loop   per expert (weights * (ids == e)).sum(-1) * expert_e(x), summed
The expert's unit is recognised by expert_unit.recognise_unit; the expert outputs must be
multiplied exactly once, by the routing weights the router produced.
"""
from __future__ import annotations

import torch
from torch import fx

from .expert_unit import ExpertMLP, Unit, lossy_cast, match_expert_mlp, recognise_unit
from .infra import PASS_THROUGH, ancestors, aten, descendants, getitem_users, is_op, only_user, skip_pass_through, users, val
from .matches import MoEMatch
from .moe_router import is_last_dim

GROUPED_MM: tuple = (torch.ops.aten._grouped_mm.default,) if hasattr(torch.ops.aten, "_grouped_mm") else ()


def refresh_grouped_mm_ops() -> None:
    # transformers registers its fallback op lazily; pick it up if it appeared since import.
    global GROUPED_MM
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None and fallback.default not in GROUPED_MM:
        GROUPED_MM = GROUPED_MM + (fallback.default,)


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
    h, gate_up_bias = _after_grouped_gemm(mms[0], outs.get(0), c["num_experts"])
    y, down_bias = _after_grouped_gemm(mms[1], outs.get(0), c["num_experts"])
    (gate_up, gate_up_t), (down, down_t) = _grouped_weight(mms[0]), _grouped_weight(mms[1])
    unit = recognise_unit([h], mms[1].args[0], val(h).shape[-1])
    if isinstance(unit, str):
        return unit
    weights = _weighting(y, output, c["weights"], c["ids"], (outs.get(0), outs.get(1), c["num_experts"]),
                         val(gathers[0]).dtype)
    if isinstance(weights, str):
        return weights
    c = {**c, "weights": weights}
    return MoEMatch("grouped_mm", hidden=gathers[0].args[0], output=output, gate_up=gate_up, down=down,
                    gate_up_transposed=gate_up_t, down_transposed=down_t, gate_up_bias=gate_up_bias,
                    down_bias=down_bias, unit=unit, internal=_internal([c["ids"], c["weights"]], output), **c)


def _grouped_weight(mm: fx.Node) -> tuple[fx.Node, bool]:
    """(stacked weight, transposed): [E, out, in] read through a transpose (transformers' default), or
    [E, in, out] read directly (`is_transposed` experts such as gpt-oss's). The weight is the node the GEMM
    reads, casts and views included (a cast of the weights, fp8 emulation say, is part of what it multiplies by)."""
    arg = mm.args[1]
    if is_op(arg, aten.transpose.int) and sorted(d % 3 for d in arg.args[1:]) == [1, 2]:
        return arg.args[0], False
    return arg, True


def _after_grouped_gemm(mm: fx.Node, sorted_ids: fx.Node | None, num_experts: int) -> tuple[fx.Node, fx.Node | None]:
    """(values, bias): the GEMM's rows after an optional per-expert bias bias[sorted ids] (transformers
    adds it in place) and the fills that zero rows of sentinel ids >= E (never taken by a router's
    picks); bias is the [E, out] stacked bias or None."""
    node, bias = mm, None
    adds = users(node, aten.add.Tensor, aten.add_.Tensor)
    if len(adds) == 1 and adds[0].args[0] is node:
        gathered = adds[0].args[1]
        if is_op(gathered, aten.index.Tensor) and _derives_from(gathered.args[1][0], sorted_ids):
            node, bias = adds[0], skip_pass_through(gathered.args[0])
    while (nxt := only_user(node)) is not None and is_op(nxt, aten.masked_fill.Scalar, aten.masked_fill_.Scalar) \
            and _is_sentinel_mask(nxt.args[1], sorted_ids, num_experts):
        node = nxt
    return node, bias


def _is_unsort(indices: list, order: fx.Node | None) -> bool:
    """indices == [inverse of `order`], built as index_put_(empty, [order], arange(n))."""
    if len(indices) != 1 or order is None:
        return False
    inverse = skip_pass_through(indices[0])
    return (is_op(inverse, aten.index_put_.default, aten.index_put.default) and len(inverse.args[1]) == 1
            and skip_pass_through(inverse.args[1][0]) is order and is_op(inverse.args[2], aten.arange.default))


def _derives_from(node: fx.Node, source: fx.Node | None) -> bool:
    """`node` is `source` behind views, casts and clamps (transformers clamps sentinel ids in place)."""
    while is_op(node, aten.clamp.default, aten.clamp_.default, *PASS_THROUGH):
        node = node.args[0]
    return source is not None and node is source


def _is_sentinel_mask(mask: fx.Node, sorted_ids: fx.Node | None, num_experts: int) -> bool:
    mask = skip_pass_through(mask)
    while is_op(mask, aten.unsqueeze.default):
        mask = skip_pass_through(mask.args[0])
    return (is_op(mask, aten.ge.Scalar) and _derives_from(mask.args[0], sorted_ids)
            and mask.args[1] == num_experts)


# Ops allowed after the down GEMM: weighting, unsorting.
_COMBINE_OPS = (aten.masked_fill.Scalar, aten.masked_fill_.Scalar, aten.mul.Tensor, aten.index.Tensor,
                aten.unsqueeze.default, aten.sum.dim_IntList) + PASS_THROUGH


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _weighting(down: fx.Node, output: fx.Node, weights: fx.Node | None, ids: fx.Node, sort: tuple,
               dtype: torch.dtype) -> fx.Node | str:
    """The routing weights [..., k] when the down GEMM's rows (`down`, after its bias) are multiplied
    once by them and summed back per token (with a fused router: exactly the weights it produced);
    else what differs. `sort` = (sorted ids, sort order, E): the only fills allowed zero the rows of
    sentinel ids >= E, and the only row gather is the unsort (the inverse of the sort order); casts keep
    the values of the hidden `dtype`."""
    sorted_ids, order, num_experts = sort
    path = (descendants([down]) & (ancestors(output) | {output})) - {output}
    foreign = [n for n in path if n.op == "call_function" and not is_op(n, *_COMBINE_OPS)]
    foreign += [n for n in path if is_op(n, aten.masked_fill.Scalar, aten.masked_fill_.Scalar)
                and not _is_sentinel_mask(n.args[1], sorted_ids, num_experts)]
    foreign += [n for n in path if is_op(n, aten.index.Tensor) and not _is_unsort(n.args[1], order)]
    if foreign:
        return f"expert outputs go through {_name(foreign[0])} ({foreign[0].name}) before the combine"
    if cast := lossy_cast(path, dtype):
        return f"expert outputs are cast to {val(cast).dtype} ({cast.name}), which rounds beyond the hidden {dtype}"
    muls = [n for n in path if is_op(n, aten.mul.Tensor)]
    if len(muls) != 1:
        return f"expert outputs are multiplied {len(muls)} times before the combine (expected: once, by the weights)"
    other = [a for a in muls[0].args if isinstance(a, fx.Node) and a not in path and a is not down]
    return _same_weights(other[0] if len(other) == 1 else None, weights, ids, dtype)


def _same_weights(factor: fx.Node | None, weights: fx.Node | None, ids: fx.Node, dtype: torch.dtype) -> fx.Node | str:
    """`weights` when the expert outputs' factor is those weights (gathered, viewed, or cast to dtypes holding the
    hidden `dtype`: the op rounds them to it); with graph routing (weights None), the factor's source when it is a
    per-pick tensor shaped like ids."""
    path = _walk(factor, aten.unsqueeze.default, aten.index.Tensor, aten.select.int, aten.expand.default,
                 *PASS_THROUGH) if factor is not None else [None]
    if cast := lossy_cast(path, dtype):
        return (f"expert outputs are scaled by routing weights cast to {val(cast).dtype} ({cast.name}), which rounds "
                f"them beyond the hidden {dtype}")
    source = path[-1]
    if source is not None and (write := _written(source)) is not None:
        return f"expert outputs are scaled by routing weights that {write.name} writes into in place"
    if weights is not None:
        if source is not None and source is skip_pass_through(weights):
            return weights
    elif source is not None and val(source).shape == val(ids).shape:
        return source
    return ("expert outputs are scaled by something other than the routing weights (a routed scaling "
            "factor or per-expert scale the fused op does not apply)")


def _written(node: fx.Node) -> fx.Node | None:
    """An op writing into `node` in place, directly or through a view of it (None: none does)."""
    for u in node.users:
        schema = getattr(u.target, "_schema", None)
        if schema is None or not schema.arguments or not u.args or u.args[0] is not node:
            continue
        alias = schema.arguments[0].alias_info  # set when the op writes into its input or returns a view of it
        if alias is not None and alias.is_write:
            return u
        if alias is not None and (found := _written(u)) is not None:
            return found
    return None


def _walk(node: fx.Node, *ops) -> list[fx.Node]:
    """`node` and the nodes above it through `ops` (by their first argument), the first not among them last."""
    path = [node]
    while is_op(path[-1], *ops):
        path.append(path[-1].args[0])
    return path


def _nearest(start: fx.Node | None, predicate, limit: int) -> list[fx.Node]:
    """Nodes satisfying `predicate` at the smallest depth (<= limit) below `start`."""
    frontier = [start] if start is not None else []
    for _ in range(limit):
        frontier = list({u for n in frontier for u in n.users})
        found = [n for n in frontier if predicate(n)]
        if found:
            return found
    return []


def _dense_loop(c: dict) -> MoEMatch | str | None:
    E, ids, weights = c["num_experts"], c["ids"], c["weights"]
    if weights is None:
        return None
    eqs = {_expert_id(u.args[1]): u for u in users(ids, aten.eq.Scalar)}
    if set(eqs) != set(range(E)):
        return None
    terms, per_expert, hidden = [], [], None
    for e in range(E):
        mask_mul = next((u for u in users(eqs[e], aten.mul.Tensor) if weights in u.args), None)
        gate = only_user(mask_mul) if mask_mul is not None else None
        scale = only_user(gate) if is_op(gate, aten.sum.dim_IntList) else None
        if not is_op(scale, aten.mul.Tensor) or not is_last_dim(mask_mul, gate.args[1][0]):
            return None
        y = scale.args[1] if scale.args[0] is gate else scale.args[0]
        mlp = match_expert_mlp(y)
        if mlp is None:
            return f"expert output comes from {_name(y)} ({y.name}), not from a down projection (a linear)"
        if isinstance(mlp, str):
            return mlp
        if hidden is not None and mlp.x is not hidden:
            return None
        hidden = mlp.x
        per_expert.append(mlp)
        terms.append(scale)
    output = _sum_chain(terms)
    if output is None:
        return None
    # The experts read only `hidden`: their nodes are the output's ancestors that are not the
    # input's or the router's.
    outside = ancestors(hidden) | ancestors(ids) | ancestors(weights) | {hidden, ids, weights}
    unit = _one_unit(per_expert)
    if isinstance(unit, str):
        return unit
    return MoEMatch("dense_loop", hidden=hidden, output=output, per_expert=per_expert, unit=unit,
                    internal=_internal([ids, weights], output) | (ancestors(output) - outside), **c)


def _sum_chain(terms: list[fx.Node]) -> fx.Node | None:
    """The last add of a chain zeros + term_0 + term_1 + ... (or term_0 + term_1 + ...) that adds every
    term exactly once and nothing else."""
    pending = set(terms)
    node = next((u for u in terms[0].users if is_op(u, aten.add.Tensor)), None)
    if node is None or len(node.args) != 2:
        return None
    a, b = node.args
    if not (a in pending and (b in pending or is_zeros(b)) or b in pending and is_zeros(a)):
        return None
    pending -= {a, b}
    while pending:
        nxt = only_user(node)
        other = [x for x in nxt.args if x is not node] if is_op(nxt, aten.add.Tensor) and len(nxt.args) == 2 else []
        if len(other) != 1 or other[0] not in pending:
            return None
        pending.discard(other[0])
        node = nxt
    return node


def is_zeros(node) -> bool:
    """A zero scalar, or a tensor made full of zeros (zeros, zeros_like, new_zeros, full(..., 0))."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node == 0
    node = skip_pass_through(node) if isinstance(node, fx.Node) else node
    if is_op(node, aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        return True
    return is_op(node, aten.full.default, aten.full_like.default, aten.new_full.default) and node.args[-1] == 0

def _one_unit(per_expert: list[ExpertMLP]) -> Unit | str:
    """The experts' common unit and bias structure (the op applies one unit to every expert)."""
    first = per_expert[0]
    for mlp in per_expert[1:]:
        if mlp.unit != first.unit:
            return f"experts compute different units ({first.unit.describe()} and {mlp.unit.describe()})"
        if (mlp.gate_up_bias is None, mlp.down_bias is None, len(mlp.gate_up), mlp.gate_up_transposed,
                mlp.down_transposed) != (first.gate_up_bias is None, first.down_bias is None, len(first.gate_up),
                                         first.gate_up_transposed, first.down_transposed):
            return "experts differ in their projections or biases"
    return first.unit


def _expert_id(value) -> int | None:
    """The expert id an `ids == value` comparison selects: an int, or a float equal to one (1.5 selects none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        return None
    return int(value)


def _in_graph_order(nodes) -> list[fx.Node]:
    nodes = set(nodes)
    return [n for n in next(iter(nodes)).graph.nodes if n in nodes] if nodes else []


FORMS = (_grouped_mm, _dense_loop)
