"""lower_experts: replace each matched expert computation with foe::experts_swiglu.

Expects the MoEMatch records of find_moe_blocks (and, when fuse_sum_route_dispatch ran, its
fused node, whose pairs/offsets outputs the experts consume). Preserves the block's output up
to summation order and the rounding of the routing weights to the hidden dtype (the op
multiplies in that dtype; translation validation measures the difference): it computes the
same sum over the k picks of
w * (down(unit(gate_up(x) + b1)) + b2), or down(unit(gate_up(w * x))) where the routing weight scales the
expert's input (the dense form: the picks of its [T, E] weight matrix, which is 0 elsewhere), with the
unit the matcher recognised. Weights are given
to the op as [E, 2I, d] / [E, d, I] with gate rows first: stored-transposed weights are read
through a transpose and other column layouts (gpt-oss's interleaved gate/up) are reordered.
With `num_groups` H > 1 the op returns one partial per expert group and the block output is
their sum (exact form: the second all-reduce).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels import ops  # noqa: F401  registers torch.ops.foe
from ..kernels.reference import group_by_expert
from ..kernels.reference import GATED_ACTIVATIONS
from .infra import PassResult, aten, erase_unused, shape_args, val
from .matches import MOE_KEY, MoEMatch


def lower_experts(gm: fx.GraphModule, num_groups: int = 1) -> PassResult:
    matches: list[MoEMatch] = gm.meta.get(MOE_KEY, [])
    for match in matches:
        _lower(gm, match, num_groups if match.num_experts % num_groups == 0 else 1)
    return PassResult("lower_experts", len(matches))


def _lower(gm: fx.GraphModule, m: MoEMatch, num_groups: int) -> None:
    g = gm.graph
    d = val(m.hidden).shape[-1]
    out_val = val(m.output)
    with g.inserting_before(m.output):
        x = g.call_function(aten.reshape.default, (m.hidden, [-1, d]))
        ids = g.call_function(aten.reshape.default, (m.ids, [-1, m.top_k]))
        if m.weights_by_expert:  # [..., E], 0 off the picks: the weights are its values at the picks
            weights = g.call_function(aten.reshape.default, (m.weights, [-1, m.num_experts]))
            weights = g.call_function(aten.gather.default, (weights, 1, ids))
        else:
            weights = g.call_function(aten.reshape.default, (m.weights, [-1, m.top_k]))
        weights = g.call_function(aten.to.dtype, (weights, val(m.hidden).dtype))
        if m.route is None:
            grouped = g.call_function(group_by_expert, (ids, m.num_experts))
            pairs, offsets = (g.call_function(operator.getitem, (grouped, i)) for i in (0, 1))
        else:  # outputs 4 and 5 of foe::sum_route_dispatch
            pairs, offsets = (g.call_function(operator.getitem, (m.route, i)) for i in (4, 5))
        gate_up, down, gate_up_bias, down_bias = _stacked_weights(g, m)
        u = m.unit
        partial = g.call_function(torch.ops.foe.experts_swiglu.default,  # every schema argument, by position
                                  (x, gate_up, down, ids, weights, pairs, offsets, num_groups, u.activation,
                                   gate_up_bias, down_bias, u.alpha, u.limit, u.up_offset, m.weight_input))
        y = g.call_function(aten.sum.dim_IntList, (partial, [0]))
        y = g.call_function(aten.reshape.default, (y, shape_args(g, out_val.shape)))
        y = g.call_function(aten.to.dtype, (y, out_val.dtype))
    y.meta["val"] = out_val
    m.output.replace_all_uses_with(y)
    erase_unused(gm, m.internal | {m.output})
    m.output, m.group_partials = y, partial


def _stacked_weights(g: fx.Graph, m: MoEMatch) -> tuple[fx.Node, fx.Node, fx.Node | None, fx.Node | None]:
    """(gate_up [E, R, d], down [E, d, I], gate_up_bias [E, R] or None, down_bias [E, d] or None), gate rows first."""
    if m.gate_up is not None:
        gate_up, down, gate_up_bias, down_bias = m.gate_up, m.down, m.gate_up_bias, m.down_bias
        if m.gate_up_transposed:
            gate_up = g.call_function(aten.transpose.int, (gate_up, 1, 2))
        if m.down_transposed:
            down = g.call_function(aten.transpose.int, (down, 1, 2))
    else:
        # NOTE: per-expert nn.Linear weights are stacked on every call; a frozen-weights compile could
        # fold this into a constant.
        def stack(pieces: list, transposed: bool = False) -> fx.Node:
            stacked = g.call_function(aten.stack.default, (pieces,))
            return g.call_function(aten.transpose.int, (stacked, 1, 2)) if transposed else stacked

        experts, first = m.per_expert, m.per_expert[0]

        def joined(pieces: tuple, dim: int = 0) -> fx.Node:
            return pieces[0] if len(pieces) == 1 else g.call_function(aten.cat.default, (list(pieces), dim))

        gate_up = stack([joined(e.gate_up, int(first.gate_up_transposed)) for e in experts], first.gate_up_transposed)
        down = stack([e.down for e in experts], first.down_transposed)
        gate_up_bias = stack([joined(e.gate_up_bias) for e in experts]) if experts[0].gate_up_bias else None
        down_bias = stack([e.down_bias for e in experts]) if experts[0].down_bias is not None else None
    if m.unit.layout != "halves" and m.unit.activation in GATED_ACTIVATIONS:
        gate_up = _gate_rows_first(g, gate_up, m.unit.layout)
        gate_up_bias = _gate_rows_first(g, gate_up_bias, m.unit.layout) if gate_up_bias is not None else None
    return gate_up, down, gate_up_bias, down_bias


def _gate_rows_first(g: fx.Graph, stacked: fx.Node, layout: str) -> fx.Node:
    """`stacked` [E, R, ...] with its R rows reordered from `layout` into [gate; up]
    (expert_unit._gate_first on the weights, spelled in the graph)."""
    if layout.startswith("interleaved"):
        halves = [g.call_function(aten.slice.Tensor, (stacked, 1, start, None, 2)) for start in (0, 1)]
    else:
        halves = [g.call_function(operator.getitem, (g.call_function(aten.chunk.default, (stacked, 2, 1)), i))
                  for i in (0, 1)]
    if layout.endswith("up_first"):
        halves.reverse()
    return g.call_function(aten.cat.default, (halves, 1))
