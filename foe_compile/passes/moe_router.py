"""Router matching for find_moe_blocks: which top-k is a router's, and whether foe::sum_route_dispatch
computes its routing exactly (else the routing stays in the graph as written, with the reason).

Anchors: aten.topk, and the expert ids of a router that picks its k experts one argmax at a time
(max(dim=-1, keepdim=True)[1] / argmax(-1, keepdim=True) per slot, concatenated over the last
dim; PhiMoE's sparsemixer masks each pick's neighbourhood and picks again). The latter's routing
always stays in the graph as written; only its experts are lowered."""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from .group_limit import match_group_limit
from .infra import (PASS_THROUGH, ancestors, aten, getitem_users, is_op, only_user, skip_exact, skip_pass_through,
                    users, val)

# torch.export records a `with torch.no_grad():` region as this higher-order op over a submodule.
_GRAD_REGION = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
_CAT = (aten.cat.default, aten.concat.default)
# foe::sum_route_dispatch's router-variant arguments in schema order (ops.ROUTE_SCHEMA), with their defaults.
DEFAULT_VARIANT = {"scoring": "softmax", "router_bias": None, "correction_bias": None, "routed_scaling": 1.0,
                   "n_group": 1, "topk_group": 1, "group_fill_zero": False, "expert_scale": None, "renorm_eps": 0.0,
                   "renorm_min": 0.0, "topk_first": False}


def is_last_dim(node: fx.Node, dim) -> bool:
    return dim in (-1, val(node).dim() - 1)


def match_router(topk: fx.Node):
    """(topk, linear, ids, weights, variant, renormalize, None) for a router foe::sum_route_dispatch
    computes exactly; a reason (str) for a router it cannot; None when `topk` is not a router's.

    Exact: topk(group_limit(score(linear(x) [+ b]) [+ correction])) with score softmax, sigmoid or
    sqrt(softplus) and DeepSeek-V3's optional group limit (group_limit.py), weights the scores at the picks
    [/ (their sum [+ eps] | clamp(their sum, min))] [* a constant] [* expert_scale[ids]]; and
    score(topk(linear(x)).values) with score softmax or sigmoid (top-k on the logits: the op's
    topk_first). `variant` holds the op's router-variant arguments (DEFAULT_VARIANT's keys).

    `topk` may also be the expert ids of a router picking by successive argmax (is_pick_router):
    then (ids, None, ids, None, None, False, reason): the routing stays in the graph."""
    if not is_op(topk, aten.topk.default):
        picks = _pick_scores(topk)
        if picks is None:
            return None
        why = (f"experts picked by {len(picks)} successive argmax over the router scores, not aten.topk (e.g. "
               "PhiMoE's sparsemixer; foe::sum_route_dispatch computes softmax -> top-k)")
        return topk, None, topk, None, None, False, why
    if not isinstance(topk.args[1], int):
        return None  # a data-dependent k (a sparse-attention indexer's min(k, T)) is not a router's
    source = skip_exact(topk.args[0])
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    outs = getitem_users(topk)
    if 1 not in outs:
        return None
    limit = match_group_limit(source)
    if isinstance(limit, str):
        return limit
    group = {}
    if limit is not None:
        source, group = skip_exact(limit[0]), limit[1]
    correction, scores = _correction(source)
    scored = _scoring(scores)
    if scored is not None and (scored[0] != "softmax" or correction is not None or group):
        return _variant_router(topk, outs, scores, *scored, correction, dim, largest, group)
    if group:
        return f"group-limited top-k over {_name(scores)} scores (foe::sum_route_dispatch scores a linear)"
    if is_op(source, aten.softmax.int, aten._softmax.default):
        linear, order = skip_exact(source.args[0]), "softmax_topk"
        if not is_last_dim(source, source.args[1]):
            return f"router softmax over dim {source.args[1]}, not over the experts (last dim)"
        if val(source).shape[-1] != val(linear).shape[-1] or val(topk.args[0]).shape[-1] != val(linear).shape[-1]:
            return (f"router softmax over {val(source).shape[-1]} of the {val(linear).shape[-1]} router outputs (a view "
                    "regroups them; foe::sum_route_dispatch normalises over all experts)")
    elif is_op(source, aten.linear.default):
        linear, order = source, "topk_softmax"
    else:
        return _other_router(source)
    if not is_op(linear, aten.linear.default):
        return None
    if not is_last_dim(topk.args[0], dim) or largest is False:
        return f"router top-k with dim={dim}, largest={largest} (foe::sum_route_dispatch picks the largest over experts)"
    variant = {**DEFAULT_VARIANT, "router_bias": _bias(linear)}
    if order == "softmax_topk":
        why = _precision(source, linear)
        if why:
            return why
        if 0 not in outs:
            return None
        weights, renormalize, renorm = _routing_weights(outs[0])
        return topk, linear, outs[1], *_scaled(weights, {**variant, **renorm}, outs[1], linear), renormalize, None
    return _topk_first_router(topk, outs, linear, variant)


def _topk_first_router(topk, outs, linear, variant):
    """Top-k on the logits, weights = the score of the k picked logits: softmax over the picks (Mixtral's
    spelling) or sigmoid of each, computed in float32 (the op's topk_first)."""
    picked = list(outs[0].users) if 0 in outs else []
    picked += [u for cast in picked if is_op(cast, aten.to.dtype, aten._to_copy.default) for u in cast.users]
    scored = [u for u in picked if (is_op(u, aten.softmax.int, aten._softmax.default) and is_last_dim(u, u.args[1]))
              or is_op(u, aten.sigmoid.default)]
    if len(scored) != 1:
        if any(is_op(u, aten.scatter.src, aten.scatter_.src) for u in picked):
            return (f"router {linear.name}: top-k on logits, the picked logits scattered into a [T, E] matrix and "
                    "scored there (Llama 4: -inf fill, sigmoid); foe::sum_route_dispatch scores before the top-k or "
                    "scores the picks")
        return (f"router {linear.name}: top-k on logits without a softmax over the picks or a sigmoid of each "
                "(foe::sum_route_dispatch's topk_first)")
    why = _precision(scored[0], linear)
    if why:
        return why
    variant = {**variant, "scoring": "sigmoid" if is_op(scored[0], aten.sigmoid.default) else "softmax",
               "topk_first": True}
    weights, renormalize, renorm = _routing_weights(scored[0])
    return topk, linear, outs[1], *_scaled(weights, {**variant, **renorm}, outs[1], linear), renormalize, None


def _name(node: fx.Node) -> str:
    return node.target.__name__ if hasattr(node.target, "__name__") else str(node.target)


def _precision(scores: fx.Node, linear: fx.Node) -> str | None:
    """Why the fused op would score in another precision than the source (None: the same). The op
    computes the router linear in its input's dtype and the scores in float32; in bf16 a router
    scored in bf16, or computed in float32 from upcast inputs (DeepSeek's), picks other experts."""
    if val(scores).dtype != torch.float32:
        return f"router scores computed in {val(scores).dtype} (foe::sum_route_dispatch scores in float32)"
    source_dtype = val(skip_pass_through(linear.args[0])).dtype
    if val(linear).dtype != source_dtype:
        return (f"router linear computed in {val(linear).dtype} from {source_dtype} inputs (foe::sum_route_dispatch "
                "computes it in its input's dtype)")
    return None


def _bias(linear: fx.Node) -> fx.Node | None:
    return linear.args[2] if len(linear.args) > 2 else None


def _correction(source: fx.Node) -> tuple[fx.Node | None, fx.Node]:
    """(correction bias [E], scores) when the top-k reads scores + a bias that only selects (DeepSeek-V3's
    e_score_correction_bias: a weight, not computed from the tokens); else (None, source)."""
    if is_op(source, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in source.args):
        for scores, bias in (source.args, source.args[::-1]):
            stored = bias
            while is_op(stored, aten.squeeze.default, aten.squeeze.dim, aten.unsqueeze.default, *PASS_THROUGH):
                stored = stored.args[0]  # Ernie 4.5 keeps it [1, E] and squeezes it
            if stored.op in ("get_attr", "placeholder") and val(bias).dim() == 1 and \
                    val(bias).shape[0] == val(source).shape[-1]:
                return bias, skip_exact(scores)
    return None, source


def _scoring(scores: fx.Node) -> tuple[str, fx.Node] | None:
    """(scoring, router linear) for softmax / sigmoid / sqrt(softplus) over the last dim of a linear."""
    if is_op(scores, aten.softmax.int, aten._softmax.default) and is_last_dim(scores, scores.args[1]):
        kind, logits = "softmax", scores.args[0]
        if val(scores).shape[-1] != val(skip_exact(logits)).shape[-1]:
            return None  # a softmax over part of the experts (a view regrouping them)
    elif is_op(scores, aten.sigmoid.default):
        kind, logits = "sigmoid", scores.args[0]
    elif is_op(scores, aten.sqrt.default) and is_op(scores.args[0], aten.softplus.default) and \
            tuple(scores.args[0].args[1:]) in ((), (1,), (1, 20)):
        kind, logits = "sqrtsoftplus", scores.args[0].args[0]
    else:
        return None
    linear = skip_exact(logits)
    return (kind, linear) if is_op(linear, aten.linear.default) else None


def _variant_router(topk, outs, scores, scoring, linear, correction, dim, largest, group):
    """A router with sigmoid / sqrt-softplus scoring, a selection-only correction bias or a group limit:
    the weights are the scores at the picks (the top-k values when nothing corrects or masks them),
    optionally renormalised (with an eps) and scaled by a constant and per expert."""
    if not is_last_dim(topk.args[0], dim) or largest is False:
        return f"router top-k with dim={dim}, largest={largest} (foe::sum_route_dispatch picks the largest over experts)"
    why = _precision(scores, linear)
    if why:
        return why
    if correction is None and not group:
        if 0 not in outs:
            return None
        picked = outs[0]
    else:
        gathers = [u for u in users(scores, aten.gather.default) if u.args[2] is outs[1] and is_last_dim(u, u.args[1])]
        if len(gathers) != 1:
            return (f"router {linear.name}: top-k on bias-corrected or group-masked scores whose weights are not the "
                    "scores at the picks (foe::sum_route_dispatch weights the picks by their unmasked, uncorrected "
                    "scores)")
        picked = _skip_casts(gathers[0])  # LFM2 casts the gathered scores back with type_as
    weights, renormalize, renorm = _routing_weights(picked)
    variant = {**DEFAULT_VARIANT, "scoring": scoring, "router_bias": _bias(linear), "correction_bias": correction,
               **group, **renorm}
    return topk, linear, outs[1], *_scaled(weights, variant, outs[1], linear), renormalize, None


def _scaled(weights: fx.Node, variant: dict, ids: fx.Node, linear: fx.Node) -> tuple[fx.Node, dict]:
    """(weights, variant) after an optional multiplication by a constant (a routed scaling factor), then an
    optional one by a stored per-expert scale at the picks (Gemma 4's per_expert_scale[ids], in the router's
    dtype or float32), in that order (the op's)."""
    nxt = only_user(weights)
    if is_op(nxt, aten.mul.Tensor) and any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in nxt.args):
        factor = next(a for a in nxt.args if isinstance(a, (int, float)))
        weights, variant = _skip_casts(nxt), {**variant, "routed_scaling": float(factor)}
    nxt = only_user(weights)
    if is_op(nxt, aten.mul.Tensor) and val(nxt).dtype == val(weights).dtype:
        other = nxt.args[1] if nxt.args[0] is weights else nxt.args[0]
        scale = _expert_scale(other, ids, val(linear.args[1]).dtype)
        if scale is not None:
            weights, variant = _skip_casts(nxt), {**variant, "expert_scale": scale}
    return weights, variant


def _skip_casts(node: fx.Node) -> fx.Node:
    while (cast := only_user(node)) is not None and is_op(cast, aten.to.dtype, aten._to_copy.default,
                                                          aten.type_as.default):
        node = cast
    return node


def _expert_scale(node, ids: fx.Node, router_dtype) -> fx.Node | None:
    """The stored [E] scale when `node` is scale[ids] (aten.index by the router's expert ids), else None."""
    if not is_op(node, aten.index.Tensor) or len(node.args[1]) != 1 or node.args[1][0] is not ids:
        return None
    scale = node.args[0]
    if scale.op not in ("get_attr", "placeholder") or val(scale).dim() != 1 or \
            val(scale).shape[0] != val(ids.args[0].args[0]).shape[-1] or val(scale).dtype not in (router_dtype, torch.float32):
        return None
    return scale


def _other_router(scores: fx.Node) -> str | None:
    """Why a top-k over something other than softmax(linear) is not fused (None: not a router)."""
    if not any(is_op(a, aten.linear.default) for a in [scores, *ancestors(scores)]):
        return None
    kind = scores.target.__name__ if hasattr(scores.target, "__name__") else str(scores.target)
    return (f"router scores come from {kind} (foe::sum_route_dispatch fuses softmax scoring only); "
            "the block is left as written")


def _routing_weights(values: fx.Node) -> tuple[fx.Node, bool, dict]:
    """Follow top-k values (scores, never negative) through an optional renormalisation (v / v.sum(-1),
    v / (v.sum(-1) + eps), v / v.sum(-1).clamp(min=m), or DBRX's v / torch.norm(v, p=1, dim=-1): the
    same sum for values >= 0) and casts: (weights, renormalize, {renorm_eps or renorm_min})."""
    node, renormalize, renorm = values, False, {}
    sums = users(values, aten.sum.dim_IntList) + [n for n in users(values, aten.linalg_vector_norm.default)
                                                  if n.args[1] == 1 and (n.args[3] if len(n.args) > 3 else False)]
    dims = sums[0].args[1 + is_op(sums[0], aten.linalg_vector_norm.default)] if len(sums) == 1 else None
    if isinstance(dims, (list, tuple)) and list(dims) in ([-1], [val(values).dim() - 1]):
        total, eps = _renorm_denominator(sums[0])
        divs = [u for u in users(values, aten.div.Tensor, aten.div_.Tensor) if u.args[1] is total]
        if len(divs) == 1:
            node, renormalize, renorm = divs[0], True, eps
    return _skip_casts(node), renormalize, renorm


def _renorm_denominator(total: fx.Node) -> tuple[fx.Node, dict]:
    """(denominator, variant) for a renormalising sum: itself, sum + eps (DeepSeek-V3 lineage, LFM2) or
    sum.clamp(min=m) (Ernie 4.5), with a constant finite eps / m >= 0."""
    nxt = only_user(total)
    if is_op(nxt, aten.add.Tensor) and nxt.args[0] is total and _nonnegative(nxt.args[1]) and len(nxt.args) == 2 \
            and nxt.kwargs.get("alpha", 1) == 1:
        return nxt, {"renorm_eps": float(nxt.args[1])}
    if is_op(nxt, aten.clamp.default, aten.clamp_min.default) and nxt.args[0] is total and len(nxt.args) == 2 and \
            not nxt.kwargs.get("max") and _nonnegative(nxt.args[1]):
        return nxt, {"renorm_min": float(nxt.args[1])}
    return total, {}


def _nonnegative(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def routing_size(anchor: fx.Node) -> tuple[int, int]:
    """(k, number of experts) of a router anchor: an aten.topk, or the ids of a pick router."""
    if is_op(anchor, aten.topk.default):
        return int(anchor.args[1]), int(val(anchor.args[0]).shape[-1])
    picks = _pick_scores(anchor)
    return len(picks), int(val(picks[0]).shape[-1])


def is_pick_router(node: fx.Node) -> bool:
    """Whether `node` holds the expert ids [..., k] of a router that picks one expert per slot by
    an argmax over scores computed from a linear (see _pick_scores)."""
    return _pick_scores(node) is not None


def _pick_scores(node: fx.Node) -> list[fx.Node] | None:
    """The scores [..., E] of each slot when `node` is k argmax picks [..., 1] concatenated over the
    last dim (or one pick not concatenated with others), all over E >= 2 experts and downstream of
    a linear; else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or "val" not in node.meta:
        return None
    if is_op(node, *_CAT):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        scores = [_argmax_pick(t) for t in node.args[0]] if is_last_dim(node, dim) else [None]
    else:
        scores = [_argmax_pick(node)]
        if any(_pick_scores(u) is not None for u in node.users if is_op(u, *_CAT)):
            return None  # one slot of a concatenated pick router: the concatenation is the anchor
    if not scores or any(s is None for s in scores):
        return None
    ids = val(node)
    sizes = [val(s).shape[-1] for s in scores if "val" in s.meta]
    if not sizes or not all(isinstance(size, int) for size in sizes):  # symbolic sizes are not hashable
        return None
    if (ids.is_floating_point() or ids.dim() < 2 or ids.shape[-1] != len(scores) or len(set(sizes)) != 1
            or sizes[0] < 2):
        return None
    if not any(is_op(a, aten.linear.default) for a in ancestors(node)):
        return None
    return scores


def _argmax_pick(node) -> fx.Node | None:
    """The scores [..., E] when `node` is their argmax over the last dim kept as [..., 1]
    (max(dim=-1, keepdim=True)[1] or argmax(dim=-1, keepdim=True)), also when computed inside a
    torch.no_grad() region (the scores are then a node of that region's graph); else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.target is operator.getitem and _GRAD_REGION is not None and is_op(node.args[0], _GRAD_REGION):
        region = node.args[0]
        try:
            body = node.graph.owning_module.get_submodule(region.args[1].target)
        except (AttributeError, TypeError):
            return None
        outputs = body.graph.output_node().args[0]
        index = node.args[1]
        if not isinstance(outputs, (list, tuple)) or not isinstance(index, int) or index >= len(outputs):
            return None
        return _argmax_pick(outputs[index])
    if node.target is operator.getitem and node.args[1] == 1 and is_op(node.args[0], aten.max.dim):
        op = node.args[0]
    elif is_op(node, aten.argmax.default):
        op = node
    else:
        return None
    scores = op.args[0]
    dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
    keepdim = op.args[2] if len(op.args) > 2 else op.kwargs.get("keepdim", False)
    if dim is None or not keepdim or not isinstance(scores, fx.Node) or "val" not in scores.meta:
        return None
    return scores if is_last_dim(scores, dim) else None
