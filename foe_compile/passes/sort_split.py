"""The sort + split expert form (JetMoE's, and a common hand-written one), for find_moe_blocks.

    order  = argsort(ids.flatten())            (or sort(...).indices; ascending)
    token  = order // k                        (floor_divide, or div with rounding)
    chunks = x[token].split(counts)            counts[e] = how many picks chose expert e
    y      = cat([expert_e(chunks[e]) for e])  in expert order
    out    = zeros.index_add(0, token, y * weights.flatten()[order][:, None])

or with the unit applied across the concatenated projections (JetMoE's and Aria's parallel experts):
    h = cat([linear(chunks[e], W_in[e])]); a = unit(h); y = cat([linear(a.split(counts)[e], W_out[e])]),
and/or with the picks put back in token-major order before weighting (Aria's):
    out = (zeros[T*k, d].index_copy_(0, order, y).view(T, k, d) * weights.unsqueeze(-1)).sum(1).

Row p of the sorted pairs is pick order[p] = (token order[p] // k, slot order[p] % k); its expert
is ids.flatten()[order[p]], and the chunks hold exactly the rows of experts 0, 1, ... in turn when
the split sizes are the pick counts per expert in that order. So out[t] is the sum over t's k picks
of w * expert(x[t]), which is what foe::experts_swiglu computes. Every link of that argument is
checked on the graph: the sort of the flattened ids (ascending), the token index, the gather, the
split sizes (each the count of one expert, in order: a histogram of the ids by one_hot or a scatter
of ones, summed over the picks, held in dtypes that count exactly), the same sizes for both splits, the concatenations in order, the
weights gathered by the same order, and the combine into zeros.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .expert_forms import _internal, _one_unit, _walk, _written, is_zeros
from .select_loop import scaled_index_add
from .expert_unit import ExpertMLP, as_linear, lossy_cast, match_expert_mlp, recognise_unit, unit_sources
from .infra import PASS_THROUGH, aten, is_op, only_user, skip_pass_through, users, val
from .matches import MoEMatch

_FLATTEN = (aten.flatten.using_ints, aten.reshape.default, aten.view.default)
_TOKEN = (aten.floor_divide.default, aten.div.Tensor_mode)
_INDEX_ADD = (aten.index_add_.default, aten.index_add.default)


def sort_split(c: dict) -> MoEMatch | str | None:
    E, k, ids, weights = c["num_experts"], c["top_k"], c["ids"], c["weights"]
    orders = [o for u in ids.users if is_op(u, *_FLATTEN) and val(u).dim() == 1
              for o in [_ascending_order(u)] if o is not None]
    if len(orders) != 1:
        return None
    order = orders[0]
    token = next((u for u in order.users if is_op(u, *_TOKEN) and u.args[1] == k and _rounds_down(u)), None)
    splits = [s for g in _gathers(token) for s in users(g, aten.split_with_sizes.default)] if token else []
    if len(splits) != 1 or _split_dim(splits[0]) != 0:
        return None
    first_split = splits[0]
    if write := _written(order) or _written(token):
        return f"sort + split: {write.name} writes into the sort order or the token index in place"
    if why := _split_by_counts(first_split, ids, E):
        return f"sort + split: {why}"
    chunks = _parts(first_split, E)
    dtype = val(first_split.args[0]).dtype
    combined = _index_add_combine(token, order, weights, ids, dtype) or _unsort_combine(order, weights, ids, k, dtype)
    if chunks is None or combined is None:
        return None
    if isinstance(combined, str):
        return f"sort + split: {combined}"
    cat, weights, output = combined
    if _cat_dim(cat) != 0 or len(cat.args[0]) != E:
        return None
    per_expert = _per_chunk_experts(cat.args[0], chunks)
    if per_expert is None:
        per_expert = _parallel_experts(cat.args[0], chunks, ids)
    if per_expert is None:
        return None
    if isinstance(per_expert, str):
        return f"sort + split: {per_expert}"
    unit = _one_unit(per_expert)
    if isinstance(unit, str):
        return unit
    hidden = first_split.args[0].args[0]
    return MoEMatch("sort_split", hidden=hidden, output=output, per_expert=per_expert, unit=unit,
                    internal=_internal([ids, weights], output), **{**c, "weights": weights})


def _gathers(token: fx.Node) -> list[fx.Node]:
    """x[token] or x.index_select(0, token)."""
    return [u for u in token.users if (is_op(u, aten.index.Tensor) and u.args[1] == [token])
            or (is_op(u, aten.index_select.default) and u.args[1] == 0 and u.args[2] is token)]


def _index_add_combine(token: fx.Node, order: fx.Node, weights, ids: fx.Node, dtype: torch.dtype):
    """(cat, weights, output) for zeros.index_add(0, token, cat(...) * weights.flatten()[order][:, None])."""
    combine = next((u for u in token.users if is_op(u, *_INDEX_ADD) and u.args[2] is token), None)
    if combine is None or combine.args[1] != 0 or not is_zeros(combine.args[0]):
        return None
    if why := scaled_index_add(combine):
        return why
    scaled = skip_pass_through(combine.args[3])
    if not is_op(scaled, aten.mul.Tensor):
        return "expert outputs are combined without being multiplied by their routing weights"
    cat = next((skip_pass_through(a) for a in scaled.args if is_op(skip_pass_through(a), aten.cat.default)), None)
    if cat is None:
        return None
    factor = next((a for a in scaled.args if skip_pass_through(a) is not cat), None)
    weights = _sorted_weights(factor, order, weights, ids, dtype)
    return weights if isinstance(weights, str) else (cat, weights, combine)


def _unsort_combine(order: fx.Node, weights, ids: fx.Node, k: int, dtype: torch.dtype):
    """(cat, weights, output) for u = zeros[T*k, d].index_copy_(0, order, cat(...)) (the picks back in
    token-major order), then (u.view(T, k, d) * weights.unsqueeze(-1)).sum(1), the weights cast only to dtypes
    holding the hidden `dtype`."""
    copy = next((u for u in order.users if is_op(u, aten.index_copy_.default, aten.index_copy.default)
                 and u.args[2] is order), None)
    if copy is None or copy.args[1] != 0 or not is_zeros(copy.args[0]):
        return None
    cat = skip_pass_through(copy.args[3])
    if not is_op(cat, aten.cat.default):
        return None
    per_pick = only_user(copy)
    if not is_op(per_pick, aten.view.default, aten.reshape.default) or tuple(val(per_pick).shape[:2]) != tuple(
            val(ids).shape):
        return None
    scaled = only_user(per_pick)
    if not is_op(scaled, aten.mul.Tensor) or per_pick not in scaled.args:
        return "expert outputs are combined without being multiplied by their routing weights"
    factor = next(a for a in scaled.args if a is not per_pick)
    total = only_user(scaled)
    if not is_op(total, aten.sum.dim_IntList) or [d % val(scaled).dim() for d in total.args[1]] != [1]:
        return "the weighted picks are not summed over the k slots"
    chain = _walk(factor, aten.unsqueeze.default, *PASS_THROUGH)
    if cast := lossy_cast(chain, dtype):
        return _rounded(cast, dtype)
    source = chain[-1]
    if tuple(val(factor).shape) != (*val(ids).shape, 1) or tuple(val(source).shape) != tuple(val(ids).shape):
        return "the expert outputs' factor is not the routing weights [T, k, 1]"
    if weights is not None and source is not skip_pass_through(weights):
        return "expert outputs are scaled by something other than the routing weights"
    return cat, weights if weights is not None else source, total


def _ascending_order(flat: fx.Node) -> fx.Node | None:
    """The permutation sorting `flat` ascending: argsort(flat) or sort(flat)[1] (stable or not: the
    order among one expert's picks only changes which of a token's k terms is added first)."""
    for u in flat.users:
        if is_op(u, aten.argsort.default, aten.argsort.stable):
            descending = u.kwargs.get("descending", u.args[2] if len(u.args) > 2 else False)
            if u.target is aten.argsort.stable:
                descending = u.kwargs.get("descending", False)
            if not descending and u.kwargs.get("dim", u.args[1] if len(u.args) > 1 else -1) in (0, -1):
                return u
        if is_op(u, aten.sort.default, aten.sort.stable):
            dim = u.kwargs.get("dim", -1) if u.target is aten.sort.stable else (u.args[1] if len(u.args) > 1 else -1)
            descending = u.kwargs.get("descending", u.args[2] if u.target is aten.sort.default and len(u.args) > 2
                                      else False)
            if dim in (0, -1) and not descending:
                return next((g for g in u.users if g.target is operator.getitem and g.args[1] == 1), None)
    return None


def _rounds_down(node: fx.Node) -> bool:
    """order // k: floor_divide, or div with rounding_mode floor/trunc (the same on indices >= 0)."""
    return is_op(node, aten.floor_divide.default) or node.kwargs.get("rounding_mode") in ("floor", "trunc")


def _split_dim(split: fx.Node) -> int:
    return split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)


def _cat_dim(cat: fx.Node) -> int:
    return cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)


def _parts(split: fx.Node, count: int) -> list[fx.Node] | None:
    """The getitem nodes of `split`'s `count` outputs, in order (None if any is missing)."""
    parts = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    return [parts[i] for i in range(count)] if sorted(parts) == list(range(count)) else None


def _split_by_counts(split: fx.Node, ids: fx.Node, num_experts: int) -> str | None:
    """Why the split sizes are not the exact per-expert pick counts in expert order (None: they are)."""
    sizes = split.args[1]
    if len(sizes) != num_experts:
        return f"the split makes {len(sizes)} chunks for {num_experts} experts"
    counts = [_counts_of_expert(s, e) for e, s in enumerate(sizes)]
    if any(c is None for c in counts) or not all(_is_histogram(skip_pass_through(c), ids, num_experts) for c in counts):
        return "the split sizes are not the per-expert pick counts in expert order"
    lossy = next((n for c in counts for n in _count_chain(c) if val(n).dtype not in _EXACT_COUNTS), None)
    return None if lossy is None else (
        f"the per-expert pick counts are held in {val(lossy).dtype} ({lossy.name}), which does not count exactly")


def _counts_of_expert(size, expert: int) -> fx.Node | None:
    """The counts tensor [E] when the split size `size` is item() of its entry `expert`."""
    if not is_op(size, aten.item.default, aten._local_scalar_dense.default):
        return None
    entry = size.args[0]
    if entry.target is operator.getitem and is_op(entry.args[0], aten.unbind.int) and entry.args[1] == expert:
        if (entry.args[0].args[1] if len(entry.args[0].args) > 1 else 0) != 0:
            return None
        return entry.args[0].args[0]
    if is_op(entry, aten.select.int) and entry.args[1] == 0 and entry.args[2] == expert:
        return entry.args[0]
    return None


# Dtypes that hold the pick counts exactly: integers of 32 bits and more, and floats counting by ones exactly
# to 2^24 (float32) picks per expert, which is more tokens than one call holds.
_EXACT_COUNTS = (torch.int32, torch.int64, torch.float32, torch.float64)


def _count_chain(counts: fx.Node) -> list[fx.Node]:
    """The histogram and the views and casts from it to `counts`: each holds the counts in its dtype."""
    chain = [counts]
    while is_op(chain[-1], *PASS_THROUGH):
        chain.append(chain[-1].args[0])
    return chain


def _is_histogram(counts: fx.Node, ids: fx.Node, num_experts: int) -> bool:
    """counts [E] = one-hot rows of the picks summed over every pick: sum(one_hot(ids, E)) over all
    dims but the last, a scatter of ones into zeros [T, E] at ids summed over tokens (top-k
    picks of one token are distinct experts, so each row holds k ones), or histc of the ids with
    one bin per expert (Aria's)."""
    if not is_op(counts, aten.sum.dim_IntList, aten.histc.default) or val(counts).dim() != 1:
        return False
    if is_op(counts, aten.histc.default):  # ids (exact in float32) in E bins over [0, E - 1]: bin e holds id e
        return (2 <= num_experts <= 2 ** 16 and list(counts.args[1:4]) == [num_experts, 0, num_experts - 1]
                and val(counts.args[0]).dtype in (torch.float32, torch.float64) and _same_ids(counts.args[0], ids))
    source = skip_pass_through(counts.args[0])
    dims = sorted(d % val(source).dim() for d in counts.args[1])
    if dims != list(range(val(source).dim() - 1)):
        return False
    if is_op(source, aten.one_hot.default):
        return _same_ids(source.args[0], ids) and source.args[1] == num_experts
    if is_op(source, aten.scatter.value, aten.scatter_.value):
        return (is_zeros(source.args[0]) and source.args[1] in (-1, val(source).dim() - 1)
                and _same_ids(source.args[2], ids) and source.args[3] == 1 and val(source).shape[-1] == num_experts)
    return False


def _same_ids(node, ids: fx.Node) -> bool:
    node = skip_pass_through(node)
    while is_op(node, *_FLATTEN):
        node = skip_pass_through(node.args[0])
    return node is skip_pass_through(ids)


def _sorted_weights(factor, order: fx.Node, weights: fx.Node | None, ids: fx.Node, dtype: torch.dtype) -> fx.Node | str:
    """The routing weights [..., k] when the expert outputs' factor is weights.flatten()[order]
    (with [:, None] before or after the gather, cast only to dtypes holding the hidden `dtype`); else why
    not. With graph routing (weights None): the flattened tensor, when it is shaped like the ids."""
    if not isinstance(factor, fx.Node):
        return "the expert outputs' factor is not the routing weights gathered in the sorted order"
    walked = [factor]
    while is_op(walked[-1], aten.unsqueeze.default, aten.expand.default, *PASS_THROUGH) or _whole_slice(walked[-1]):
        walked.append(walked[-1].args[0])
    node = walked[-1]
    if not is_op(node, aten.index.Tensor) or node.args[1] != [order]:
        return "the expert outputs' factor is not the routing weights gathered in the sorted order"
    chain = _walk(node.args[0], aten.unsqueeze.default, aten.flatten.using_ints, *PASS_THROUGH)
    if cast := lossy_cast(walked + chain, dtype):
        return _rounded(cast, dtype)
    source = chain[-1]
    flattened = any(val(n).dim() == 1 or (val(n).dim() == 2 and val(n).shape[-1] == 1) for n in chain[:-1])
    if not flattened or val(source).shape != val(ids).shape:
        return "the expert outputs' factor is not the flattened routing weights"
    if weights is not None and source is not skip_pass_through(weights):
        return "expert outputs are scaled by something other than the routing weights"
    return weights if weights is not None else source


def _rounded(cast: fx.Node, dtype: torch.dtype) -> str:
    return f"the routing weights are cast to {val(cast).dtype} ({cast.name}), which rounds them beyond the hidden {dtype}"


def _whole_slice(node) -> bool:
    """x[:] along some dim (what `x[:, None]` records before its unsqueeze)."""
    if not is_op(node, aten.slice.Tensor):
        return False
    start, end, step = (*node.args[2:], *(None, None, 1)[len(node.args) - 2:])
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2 ** 62)) and step == 1


def _per_chunk_experts(outputs: list, chunks: list[fx.Node]) -> list[ExpertMLP] | str | None:
    """Expert e as a whole (projections, unit, down) on chunk e."""
    experts = []
    for e, out in enumerate(outputs):
        mlp = match_expert_mlp(skip_pass_through(out))
        if not isinstance(mlp, ExpertMLP):
            return mlp
        if mlp.x is not chunks[e]:
            return f"expert {e} does not read chunk {e} of the split"
        experts.append(mlp)
    return experts


def _parallel_experts(outputs: list, chunks: list[fx.Node], ids: fx.Node) -> list[ExpertMLP] | str | None:
    """JetMoE's parallel experts: the gate_up projection per chunk, concatenated, the unit across
    all rows, split again by the same sizes, the down projection per chunk."""
    downs = [as_linear(skip_pass_through(o)) for o in outputs]
    if any(d is None or d.bias is not None for d in downs):
        return None
    second = downs[0].x.args[0] if downs[0].x.target is operator.getitem else None
    if not is_op(second, aten.split_with_sizes.default) or _split_dim(second) != 0:
        return None
    if why := _split_by_counts(second, ids, len(outputs)):
        return f"the unit's output is not split as its input: {why}"
    if [d.x for d in downs] != _parts(second, len(outputs)):
        return "expert outputs are not the down projections of the chunks in order"
    unit_output = second.args[0]
    sources = unit_sources(unit_output, lambda n: is_op(n, aten.cat.default))
    projected = sources[0] if len(sources) == 1 else None
    if projected is None or _cat_dim(projected) != 0 or len(projected.args[0]) != len(outputs):
        return None
    ups = [as_linear(skip_pass_through(p)) for p in projected.args[0]]
    if any(u is None or u.bias is not None for u in ups) or [u.x for u in ups] != chunks:
        return "gate_up projections do not read the chunks in order"
    if len({(u.transposed, d.transposed) for u, d in zip(ups, downs)}) != 1:
        return "experts store their weights in different layouts"
    unit = recognise_unit([projected], unit_output, val(projected).shape[-1])
    if isinstance(unit, str):
        return unit
    return [ExpertMLP(chunks[e], (u.weight,), None, d.weight, None, unit, u.transposed, d.transposed)
            for e, (u, d) in enumerate(zip(ups, downs))]

