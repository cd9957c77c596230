"""lower_experts: replace each matched expert computation with foe::experts_swiglu.

Expects the MoEMatch records of find_moe_blocks (and, when fuse_sum_route_dispatch ran, its
fused node, whose pairs/offsets outputs the experts consume). Preserves the block's output exactly up to summation order: the op
computes the same sum over the k picks of w * down(silu(gate(x)) * up(x)).
With `num_groups` H > 1 the op returns one partial per expert group and the block output is
their sum (exact form: the second all-reduce).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels import ops  # noqa: F401  registers torch.ops.foe
from ..kernels.reference import group_by_expert
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
        weights = g.call_function(aten.reshape.default, (m.weights, [-1, m.top_k]))
        weights = g.call_function(aten.to.dtype, (weights, val(m.hidden).dtype))
        if m.route is None:
            grouped = g.call_function(group_by_expert, (ids, m.num_experts))
            pairs, offsets = (g.call_function(operator.getitem, (grouped, i)) for i in (0, 1))
        else:  # outputs 4 and 5 of foe::sum_route_dispatch
            pairs, offsets = (g.call_function(operator.getitem, (m.route, i)) for i in (4, 5))
        gate_up, down = m.gate_up, m.down
        if gate_up is None:
            # NOTE: per-expert nn.Linear weights are stacked on every call ([E, 2I, d] and
            # [E, d, I]); a frozen-weights compile could fold this into a constant.
            gate_up = g.call_function(aten.stack.default, ([
                g.call_function(aten.cat.default, ([gw, uw], 0)) for gw, uw, _ in m.per_expert],))
            down = g.call_function(aten.stack.default, ([dw for _, _, dw in m.per_expert],))
        partial = g.call_function(torch.ops.foe.experts_swiglu.default,
                                  (x, gate_up, down, ids, weights, pairs, offsets, num_groups))
        y = g.call_function(aten.sum.dim_IntList, (partial, [0]))
        y = g.call_function(aten.reshape.default, (y, shape_args(g, out_val.shape)))
        y = g.call_function(aten.to.dtype, (y, out_val.dtype))
    y.meta["val"] = out_val
    m.output.replace_all_uses_with(y)
    erase_unused(gm, m.internal | {m.output})
    m.output, m.group_partials = y, partial
