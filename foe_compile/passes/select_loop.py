"""The per-expert selection loop find_moe_blocks recognises after a router (expert_forms.py has the
grouped GEMM and dense mask forms, sort_split.py and dense_experts.py the others).

  for e: pick expert e's (token, slot) pairs (one_hot + where, where(ids == e), nonzero)
         -> expert_e(x[token]) -> * weights[token, slot] -> index_add_ / scatter_add_ /
         index_put_(accumulate=True) into one zero-started buffer

Each link is proven on the graph: the combine rows and the expert input are the token column of
expert e's picks, the factor is the weights at (token, slot) of the same picks, every expert
appears once, and the accumulator starts at zero.
"""
from __future__ import annotations

import operator

from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .expert_forms import _expert_id, _in_graph_order, _internal, _name, _one_unit, _same_weights, _walk, is_zeros
from .expert_unit import ExpertMLP, as_linear, lossy_cast, match_expert_mlp
from .infra import PASS_THROUGH, aten, descendants, is_op, only_user, skip_pass_through, users, val
from .matches import MoEMatch


# Ways a per-expert loop combines expert e's rows back into the output: (op, index arg, value arg).
_COMBINES = {aten.index_add_.default: (2, 3), aten.index_add.default: (2, 3),
             aten.scatter_add_.default: (2, 3), aten.scatter_add.default: (2, 3),
             aten.index_put_.default: (1, 2), aten.index_put.default: (1, 2)}


def select_loop(c: dict) -> MoEMatch | str | None:
    """A per-expert loop: for e, select the (token, slot) pairs routed to e (one_hot + where,
    where(ids == e), nonzero(ids == e)), run expert e on x[token], multiply by weights[token, slot]
    and combine into the output with index_add_, scatter_add_ or index_put_(accumulate=True)."""
    E, ids, weights = c["num_experts"], c["ids"], c["weights"]
    combines = _in_graph_order(n for n in descendants([ids]) if is_op(n, *_COMBINES)
                               and _selected_expert(_combine_index(n), ids, E) is not None)
    if len(combines) != E:
        odd = [u.args[1] for u in users(ids, aten.eq.Scalar) if _expert_id(u.args[1]) is None]
        return f"per-expert loop compares the expert ids with {odd[0]!r}, which is no expert's id" if odd else None
    why = _one_accumulator(combines)
    if why:
        return why
    per_expert, hidden, seen = [None] * E, None, set()
    for node in combines:
        _, value_pos = _COMBINES[node.target]
        if node.target in (aten.index_put_.default, aten.index_put.default):
            accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
            if not accumulate or len(node.args[1]) != 1:
                return "per-expert combine by index_put_ without accumulate=True overwrites rows"
        elif node.args[1] not in (0, -val(node).dim()):
            return None
        elif node.target in (aten.scatter_add_.default, aten.scatter_add.default) and not _rows_index(node):
            return ("per-expert combine scatter_add's index is not the token column expanded to the expert "
                    "output's full shape (token[:, None].expand(-1, d)): it adds only some columns")
        index = _combine_index(node)
        scaled = skip_pass_through(node.args[value_pos])
        if is_op(scaled, aten.expand.default):
            scaled = skip_pass_through(scaled.args[0])
        if not is_op(scaled, aten.mul.Tensor):
            return "per-expert outputs are combined without being multiplied by their routing weights"
        downs = [(s, o) for s, o in (scaled.args, scaled.args[::-1])
                 if isinstance(s, fx.Node) and as_linear(skip_pass_through(s)) is not None]
        if not downs:
            return None
        y, w = downs[0]
        mlp = match_expert_mlp(skip_pass_through(y))
        if not isinstance(mlp, ExpertMLP):
            return mlp
        dtype = val(mlp.x).dtype
        if cast := lossy_cast(_walk(node.args[value_pos], aten.expand.default, *PASS_THROUGH) + _walk(y, *PASS_THROUGH),
                              dtype):
            return f"per-expert outputs are cast to {val(cast).dtype} ({cast.name}), which rounds beyond the hidden {dtype}"
        e = _selected_expert(index, ids, E)
        if _pick_axis(index, ids) != (e, 0):
            return f"expert {e}'s outputs are combined into rows other than its tokens' (the token column of its picks)"
        if not _at_picks(w, e, ids):
            return f"expert {e}'s outputs are not multiplied by the routing weights at its picks (weights[token, slot])"
        weights = _same_weights(w, weights, ids, dtype)
        if isinstance(weights, str):
            return "per-" + weights
        x = mlp.x
        if not is_op(x, aten.index.Tensor) or len(x.args[1]) != 1:
            return None
        if e is None or not 0 <= e < E or e in seen or _pick_axis(x.args[1][0], ids) != (e, 0):
            return None
        seen.add(e)
        if hidden is not None and x.args[0] is not hidden:
            return None
        hidden = x.args[0]
        per_expert[e] = mlp
    output = combines[-1]
    while (nxt := only_user(output)) is not None and is_op(nxt, aten.reshape.default, aten.view.default):
        output = nxt
    unit = _one_unit(per_expert)
    if isinstance(unit, str):
        return unit
    return MoEMatch("select_loop", hidden=hidden, output=output, per_expert=per_expert, unit=unit,
                    internal=_internal([ids, weights], output) | set(combines), **{**c, "weights": weights})


def _one_accumulator(combines: list[fx.Node]) -> str | None:
    """None when the combines accumulate into one buffer that starts at zero, each reading the
    previous one's result (or, in place, the same buffer), with index_add_'s alpha 1; else why not."""
    base = skip_pass_through(combines[0].args[0])
    if not is_zeros(base):
        return f"per-expert outputs are accumulated into {_name(base)} ({base.name}), not into zeros"
    for previous, node in zip(combines, combines[1:]):
        if skip_pass_through(node.args[0]) not in (previous, base):
            return "per-expert combines do not accumulate into one buffer"
    return next((f"per-expert {why}" for why in map(scaled_index_add, combines) if why), None)


def scaled_index_add(node: fx.Node) -> str | None:
    """Why the combine `node` adds a multiple of its values (index_add with alpha != 1); None when it does not."""
    if node.target not in (aten.index_add_.default, aten.index_add.default):
        return None
    alpha = node.args[4] if len(node.args) > 4 else node.kwargs.get("alpha", 1)
    return f"combine index_add with alpha={alpha}" if alpha != 1 else None




def _combine_index(node: fx.Node):
    """The token-index argument of a combine op (index_put_ takes a list of one)."""
    index = node.args[_COMBINES[node.target][0]]
    return _token_source(index[0] if isinstance(index, (list, tuple)) else index)


def _rows_index(scatter_add: fx.Node) -> bool:
    """Whether scatter_add's index [n, d] is the token column expanded to the values' full shape (index[i, j] =
    token[i] for every column j of the values and of the output): a [n, 1] view or unsqueeze of the token index,
    expanded."""
    index, values = scatter_add.args[2], scatter_add.args[3]
    column = skip_pass_through(index)
    if is_op(column, aten.expand.default):
        column = column.args[0]
    rows = val(index).shape
    return (_same_sizes(rows, val(values).shape) and _same_sizes(rows[1:], val(scatter_add).shape[1:])
            and _same_sizes(val(column).shape, (rows[0], 1)) and val(_token_source(column)).dim() == 1)


def _same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))




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
            return _expert_id(n.args[1])
        if is_op(n, aten.select.int) and is_op(skip_pass_through(n.args[0]), aten.permute.default):
            one_hot = skip_pass_through(skip_pass_through(n.args[0]).args[0])
            if is_op(one_hot, aten.one_hot.default) and one_hot.args[0] is ids:
                return int(n.args[2])
        if n.target is operator.getitem or is_op(n, *_SELECTION_OPS):
            stack.append(n.args[0])
    return None


def _pick_axis(node: fx.Node, ids: fx.Node) -> tuple[int, int] | None:
    """(e, axis) when `node` holds, for the picks of expert e, their index along `axis` of the
    [T, k] ids (0: the token, 1: the slot): a column of where(mask) or of nonzero(mask), mask being
    ids == e, or expert e's plane of one_hot(ids) (any permutation of it). None otherwise."""
    node = _token_source(node)
    if node.target is operator.getitem and is_op(node.args[0], aten.where.default, aten.nonzero_numpy.default):
        mask, column = node.args[0].args[0], node.args[1]
    elif is_op(node, aten.select.int) and is_op(node.args[0], aten.nonzero.default) and node.args[1] in (1, -1):
        mask, column = node.args[0].args[0], node.args[2]
    else:
        return None
    planes = _mask_axes(skip_pass_through(mask) if isinstance(mask, fx.Node) else mask, ids)
    if planes is None or not isinstance(column, int) or not -2 <= column < 2:
        return None
    return planes[0], planes[1][column]


def _mask_axes(mask, ids: fx.Node) -> tuple[int, list[int]] | None:
    """(e, axes): `mask` [a, b] is true where ids == e, its dims being the ids' dims `axes`."""
    if val(ids).dim() != 2:
        return None
    if is_op(mask, aten.eq.Scalar) and skip_pass_through(mask.args[0]) is ids and val(mask).shape == val(ids).shape:
        e = _expert_id(mask.args[1])
        return None if e is None else (e, [0, 1])
    if not is_op(mask, aten.select.int):
        return None
    source, dim, e = skip_pass_through(mask.args[0]), mask.args[1] % 3, mask.args[2]
    order = [0, 1, 2]
    if is_op(source, aten.permute.default):
        order, source = [d % 3 for d in source.args[1]], skip_pass_through(source.args[0])
    if not is_op(source, aten.one_hot.default) or source.args[0] is not ids or order[dim] != 2:
        return None
    return int(e), [d for i, d in enumerate(order) if i != dim]


def _at_picks(factor, e: int, ids: fx.Node) -> bool:
    """Whether `factor` is the [..., k] weights gathered at expert e's picks: w[token, slot] (w
    unsqueezed before or after the gather, viewed or cast)."""
    node = _token_source(factor) if isinstance(factor, fx.Node) else None
    if not is_op(node, aten.index.Tensor) or len(node.args[1]) != 2:
        return False
    token, slot = node.args[1]
    return (tuple(val(node.args[0]).shape[:2]) == tuple(val(ids).shape)
            and _pick_axis(token, ids) == (e, 0) and _pick_axis(slot, ids) == (e, 1))
