"""The dense expert form find_moe_blocks recognises after a router: every expert runs on every token, and
the routing weight scales the expert's input (transformers' Llama4TextMoe).

    S   = full([T, E], fill).scatter(-1, ids, picked)           routing: stays in the graph as written
    W   = f(S)                                                  elementwise scores [T, E] (Llama 4: sigmoid)
    A   = (x.repeat(E, 1) * W.transpose(0, 1).reshape(-1, 1)).view(E, T, d)    A[e, t] = W[t, e] x_t
    out = (unit(A @ gate_up) @ down).view(E, T, d).sum(0)       stacked weights [E, d, 2I] / [E, I, d]

Where f(fill) is exactly 0, W is 0 off the picks; an expert without biases whose unit maps 0 to 0 gives
exactly 0 for the input 0 * x_t (for finite weights), so the dense sum is the sum over the k picks of
expert_e(W[t, e] x_t): foe::experts_swiglu with weight_input, fed W gathered at the picks (lower_experts).
Every op replaced is checked: the scatter's index is the router's ids, over the experts' dim, into a
constant fill that f maps to exactly 0 (evaluated in the scores' dtype); f is elementwise; W [T, E] is
transposed and flattened expert-major, multiplied into x repeated E times, in x's dtype; the stacked
weights are weights (not computed from the tokens), read directly ([E, in, out]) or through a transpose;
the unit is one foe::experts_swiglu computes (expert_unit) and maps 0 to 0; nothing but views lies
between the down bmm and the sum over the E experts.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .expert_forms import _grouped_weight, _internal, _name, _nearest
from .expert_unit import maps_zero_to_zero, recognise_unit
from .infra import aten, descendants, is_op, only_user, skip_pass_through, val
from .matches import MoEMatch
from .moe_router import is_last_dim

_SCATTERS = (aten.scatter.src, aten.scatter_.src, aten.scatter.value, aten.scatter_.value)
_FILLS = (aten.full.default, aten.full_like.default, aten.new_full.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# Elementwise ops the scores f may apply to the scattered matrix (one tensor input each).
_SCORE_OPS = (aten.sigmoid.default, aten.exp.default, aten.sqrt.default, aten.softplus.default, aten.relu.default,
              aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.to.dtype,
              aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default)


def dense_weighted_input(c: dict) -> MoEMatch | str | None:
    """The dense form above after graph routing (c["weights"] None); a reason when it is there but differs."""
    E, ids = c["num_experts"], c["ids"]
    if c["weights"] is not None:
        return None  # a fused router's weights: the dense form reads its own scattered matrix
    if not (ids.target is operator.getitem and is_op(ids.args[0], aten.topk.default)):
        return None  # distinct picks per token (a scatter writes a repeated pick once; the op would add it twice)
    scatters = [u for u in ids.users if is_op(u, *_SCATTERS) and skip_pass_through(u.args[2]) is ids]
    if len(scatters) != 1:
        return None
    # The nearest such product below the scatter (later layers' lie deeper).
    muls = _nearest(scatters[0], lambda n: is_op(n, aten.mul.Tensor) and _repeated_input(n, E) is not None, limit=12)
    if len(muls) != 1:
        return None
    scatter, mul = scatters[0], muls[0]
    x, scores = _repeated_input(mul, E)
    weights = _expert_major(scores, E)
    if weights is None or not statically_known_true(val(weights).shape[0] == val(x).shape[0]):
        return ("dense experts read routing weights that are not the [T, E] matrix flattened expert-major "
                f"({_name(scores)} {scores.name})")
    why = _scored_scatter(scatter, weights, E) or _same_dtype(x, weights, mul)
    if why:
        return why
    stacked = _stacked_experts(mul, x, E, c)
    if isinstance(stacked, str) or stacked is None:
        return stacked
    gate_up, down, unit, output = stacked
    return MoEMatch("dense_weighted_input", hidden=x, output=output, gate_up=gate_up[0], down=down[0],
                    gate_up_transposed=gate_up[1], down_transposed=down[1], unit=unit, weight_input=True,
                    weights_by_expert=True, internal=_internal([weights], output), **{**c, "weights": weights})


def _repeated_input(mul: fx.Node, num_experts: int) -> tuple[fx.Node, fx.Node] | None:
    """(x [T, d], the other factor) when `mul` multiplies x.repeat(E, 1) by something."""
    for rep, other in (mul.args, mul.args[::-1]):
        if is_op(rep, aten.repeat.default) and list(rep.args[1]) == [num_experts, 1] and val(rep.args[0]).dim() == 2:
            return rep.args[0], other
    return None


def _expert_major(factor: fx.Node, num_experts: int) -> fx.Node | None:
    """W [T, E] when `factor` [E*T, 1] is W.transpose(0, 1) flattened by views (row e*T + t holds W[t, e])."""
    if not isinstance(factor, fx.Node) or val(factor).dim() != 2 or val(factor).shape[1] != 1:
        return None
    node = factor
    while is_op(node, *_VIEWS, aten.unsqueeze.default, aten.flatten.using_ints):  # the row-major order stays
        node = node.args[0]
    swaps = {aten.t.default: lambda args: True, aten.transpose.int: lambda args: {d % 2 for d in args[1:]} == {0, 1},
             aten.permute.default: lambda args: [d % 2 for d in args[1]] == [1, 0]}
    if not is_op(node, *swaps) or not swaps[node.target](node.args):
        return None
    weights = node.args[0]
    return weights if val(weights).dim() == 2 and val(weights).shape[1] == num_experts else None


def _scored_scatter(scatter: fx.Node, weights: fx.Node, num_experts: int) -> str | None:
    """Why `weights` is not f(scatter) with f elementwise mapping the scatter's fill to exactly 0 (None: it is)."""
    dim = scatter.args[1]
    fill = skip_pass_through(scatter.args[0])
    if not is_last_dim(scatter, dim) or val(scatter).shape[-1] != num_experts:
        return f"dense routing weights scatter the picks over dim {dim}, not over the experts"
    if not is_op(fill, *_FILLS) or not isinstance(fill.args[-1], (int, float)) or len(fill.users) != 1:
        return f"dense routing weights scatter the picks into {_name(fill)} ({fill.name}), not into a constant fill"
    chain, node = [], weights
    while node is not scatter:
        inputs = node.all_input_nodes
        if not is_op(node, *_SCORE_OPS) or len(inputs) != 1:
            return f"dense routing weights are computed with {_name(node)} ({node.name}), not elementwise from the picks"
        chain.append(node)
        node = inputs[0]
    unpicked = torch.full((1,), float(fill.args[-1]), dtype=val(scatter).dtype)
    for n in reversed(chain):
        unpicked = n.target(*fx.node.map_arg(n.args, lambda _: unpicked), **n.kwargs)
    if not bool((unpicked == 0).all()):
        ops = " -> ".join(_name(n) for n in reversed(chain)) or "no score"
        return (f"dense routing weights are {unpicked.item()} (not exactly 0) for the experts not picked (fill "
                f"{fill.args[-1]} through {ops}): every expert contributes, which foe::experts_swiglu does not compute")
    return None


def _same_dtype(x: fx.Node, weights: fx.Node, mul: fx.Node) -> str | None:
    if val(weights).dtype == val(x).dtype == val(mul).dtype:
        return None
    return (f"dense experts scale their {val(x).dtype} input by {val(weights).dtype} routing weights (foe::experts_swiglu "
            "forms the product in the input's dtype)")


def _stacked_experts(mul: fx.Node, x: fx.Node, num_experts: int, c: dict):
    """((gate_up, transposed), (down, transposed), unit, output) of unit(A @ gate_up) @ down viewed [E, T, d] and
    summed over dim 0, A = mul viewed [E, T, d]; a reason when the experts differ from that; None when absent."""
    node = mul
    while (nxt := only_user(node)) is not None and is_op(nxt, *_VIEWS):
        node = nxt
    up = only_user(node)
    if not is_op(up, aten.bmm.default) or up.args[0] is not node or not _per_expert_rows(node, x, num_experts):
        return None
    downs = _nearest(up, lambda n: is_op(n, aten.bmm.default), limit=8)
    if len(downs) != 1:
        return None
    down = downs[0]
    width = val(up).shape[-1]
    unit = recognise_unit([up], down.args[0], width)
    if isinstance(unit, str):
        return unit
    if not maps_zero_to_zero([up], down.args[0], width):
        return f"dense experts' unit ({unit.describe()}) is not 0 at 0, so experts not picked contribute"
    weights = [_grouped_weight(up), _grouped_weight(down)]
    computed = descendants([x, c["ids"]])
    if any(w in computed or val(w).dim() != 3 or val(w).shape[0] != num_experts for w, _ in weights):
        return "dense experts multiply by something other than stacked [E, ., .] expert weights"
    output = down
    while (nxt := only_user(output)) is not None and is_op(nxt, *_VIEWS):
        output = nxt
    total = only_user(output)
    if not (is_op(total, aten.sum.dim_IntList) and list(total.args[1]) in ([0], [-3]) and len(total.args) == 2
            and not total.kwargs and _per_expert_rows(output, x, num_experts)):
        found = _name(total) if total is not None else "several users"
        return ("dense experts' outputs are not summed over the experts as they are (the down bmm's rows viewed "
                f"[E, T, d], then summed over dim 0); found {found} after the down bmm")
    return weights[0], weights[1], unit, total


def _per_expert_rows(node: fx.Node, x: fx.Node, num_experts: int) -> bool:
    """`node` is [E, T, d] with x [T, d] (static E, the same symbolic T and d)."""
    shape, want = val(node).shape, val(x).shape
    return len(shape) == 3 and shape[0] == num_experts and all(
        statically_known_true(a == b) for a, b in zip(shape[1:], want))
