"""fuse_sum_route_dispatch: residual sum + RMSNorm + router + top-k + renormalisation + grouping
by expert -> one foe::sum_route_dispatch.

Matches, for every MoE block found by find_moe_blocks:
    x  = residual + o                   (o: attention output, or its per-group partials mean)
    xn = RMSNorm(x) * w                 (aten.rms_norm, or the Hugging Face fp32 decomposition)
    ids, weights = topk(group_limit(score(linear(xn, W_router) [+ b]) [+ correction]), k) [renormalised
                   (+ eps)] [* scale] [* expert_scale[ids]], or the score of topk(logits)
                                        (score: softmax, sigmoid or sqrt(softplus); moe_router.py)
and rewrites it to one op. With quota_groups=1 (the exact form) routing is the source's global
top-k (group-limited where the source's is) and values are preserved up to summation order; with
quota_groups=H (the FoE form only) each of H blocks of E/H experts picks its k/H: the quota
replaces a source's group limit (n_group=1 is passed; reference.py's docstring). Bails out (no rewrite) when the block's input is
not such a norm of such a sum, except in the FoE form, where quota routing is part of what
was asked for and a block it cannot fuse is an error. The fused node is recorded for
lower_experts (pairs, offsets).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels import ops  # noqa: F401  registers torch.ops.foe
from .infra import (PassResult, ancestors, aten, descendants, erase_unused, is_op, shape_args, skip_pass_through,
                    val)
from .matches import MOE_KEY, PARTIALS_KEY, MoEMatch
from .moe_router import DEFAULT_VARIANT

CASTS = (aten.to.dtype, aten._to_copy.default)


def fuse_sum_route_dispatch(gm: fx.GraphModule, quota_groups: int = 1) -> PassResult:
    fused = 0
    for m in gm.meta.get(MOE_KEY, []):
        if quota_groups > 1 and m.top_k % quota_groups:
            raise ValueError(f"quota routing needs top_k={m.top_k} divisible by num_groups={quota_groups}")
        if m.graph_routing is not None:
            if quota_groups > 1:
                raise ValueError(f"the FoE form needs quota routing in foe::sum_route_dispatch, but the MoE block "
                                 f"{m.name!r} routes in a way the fused op does not compute ({m.graph_routing}); "
                                 "convert it with mode='exact' (its routing then stays as written)")
            continue
        if _fuse(gm, m, quota_groups):
            fused += 1
        elif quota_groups > 1:
            raise ValueError(
                f"the FoE form needs quota routing, but the MoE block whose router is {m.router_input.name!r} "
                "does not read RMSNorm(residual + attention output) with a constant eps (torch.compile(dynamic=True) "
                "makes eps a graph input; leave dynamic at its default), so it cannot be fused into "
                "foe::sum_route_dispatch; convert it with mode='exact'")
    return PassResult("fuse_sum_route_dispatch", fused)


def match_rms_norm(out: fx.Node) -> tuple[fx.Node, fx.Node, float, set[fx.Node]] | None:
    """(x, weight, eps, nodes of the norm) for aten.rms_norm or the HF decomposition
    weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(dtype), x32 = x.to(float32). eps must be a
    constant (under torch.compile(dynamic=True) it can be a graph input: no match then)."""
    if is_op(out, aten.rms_norm.default):
        eps = out.args[3] if len(out.args) > 3 and out.args[3] is not None else torch.finfo(val(out).dtype).eps
        return (out.args[0], out.args[2], float(eps), {out}) if isinstance(eps, (int, float)) else None
    if not is_op(out, aten.mul.Tensor):
        return None
    weight, scaled = out.args
    if not isinstance(weight, fx.Node) or not isinstance(scaled, fx.Node):
        return None
    if val(weight).dim() != 1:
        weight, scaled = scaled, weight
    inner = scaled.args[0] if is_op(scaled, *CASTS) else scaled
    if not is_op(inner, aten.mul.Tensor):
        return None
    x32, rs = inner.args
    if not is_op(rs, aten.rsqrt.default):
        x32, rs = rs, x32
    add = rs.args[0] if is_op(rs, aten.rsqrt.default) else None
    mean = add.args[0] if is_op(add, aten.add.Tensor) else None
    power = mean.args[0] if is_op(mean, aten.mean.dim) else None
    if not is_op(power, aten.pow.Tensor_Scalar) or power.args[0] is not x32 or power.args[1] != 2:
        return None
    x = x32.args[0] if is_op(x32, *CASTS) else x32
    if not isinstance(add.args[1], (int, float)):
        return None
    return x, weight, float(add.args[1]), {out, scaled, inner, rs, add, mean, power, x32}


def _fuse(gm: fx.GraphModule, m: MoEMatch, quota_groups: int) -> bool:
    norm_out = skip_pass_through(m.router_input)
    norm = match_rms_norm(norm_out)
    if norm is None or skip_pass_through(m.hidden) is not norm_out:
        return False
    x, weight, eps, norm_nodes = norm
    if not is_op(x, aten.add.Tensor) or not all(isinstance(a, fx.Node) for a in x.args):
        return False
    partials_of = gm.meta.get(PARTIALS_KEY, {})
    residual, o = (x.args[1], x.args[0]) if x.args[0] in partials_of else x.args
    g, d = gm.graph, val(x).shape[-1]
    anchor = x.next
    variant = {**DEFAULT_VARIANT, **(m.routing or {})}
    if quota_groups > 1:  # the FoE form: each group's quota of k/H picks replaces a group limit
        variant.update(n_group=1, topk_group=1, group_fill_zero=False)
    _hoist([weight, m.router_weight] + [v for v in variant.values() if isinstance(v, fx.Node)], before=anchor)
    with g.inserting_before(anchor):
        res = g.call_function(aten.reshape.default, (residual, [1, -1, d]))
        if o in partials_of:
            parts = partials_of[o]
            parts = g.call_function(aten.reshape.default, (parts, [val(parts).shape[0], -1, d]))
        else:
            parts = g.call_function(aten.reshape.default, (o, [1, -1, d]))
        fused = g.call_function(torch.ops.foe.sum_route_dispatch.default,  # every schema argument, by position
                                (res, parts, weight, eps, m.router_weight, quota_groups, m.top_k, m.renormalize,
                                 *(variant[key] for key in DEFAULT_VARIANT)))
        r, xn, ids, weights = (g.call_function(operator.getitem, (fused, i)) for i in range(4))
        r = g.call_function(aten.reshape.default, (r, shape_args(g, val(x).shape)))
        xn = g.call_function(aten.to.dtype, (g.call_function(aten.reshape.default, (
            xn, shape_args(g, val(norm_out).shape))), val(norm_out).dtype))
        ids = g.call_function(aten.reshape.default, (ids, shape_args(g, val(m.ids).shape)))
        weights = g.call_function(aten.to.dtype, (g.call_function(aten.reshape.default, (
            weights, shape_args(g, val(m.weights).shape))), val(m.weights).dtype))
        # x itself, and an fp32 cast of x (same values; Hugging Face reads it as the residual)
        aliases = [x] + [n for n in norm_nodes if is_op(n, *CASTS) and n.args[0] is x]
        r_as = {a: r if val(a).dtype == val(x).dtype else g.call_function(aten.to.dtype, (r, val(a).dtype))
                for a in aliases}
    for new, old in ((r, x), (xn, norm_out), (ids, m.ids), (weights, m.weights)):
        new.meta["val"] = val(old)  # later passes read shapes from node.meta["val"]
    router_nodes = _between(m.router_input, {m.ids, m.weights})
    norm_out.replace_all_uses_with(xn)
    m.ids.replace_all_uses_with(ids)
    m.weights.replace_all_uses_with(weights)
    for alias, replacement in r_as.items():
        for user in [u for u in alias.users if u not in norm_nodes]:
            user.replace_input_with(alias, replacement)
    erase_unused(gm, norm_nodes | router_nodes | {x, m.ids, m.weights, m.router_input})
    m.ids, m.weights, m.route = ids, weights, fused
    if m.hidden is norm_out:  # erased above; the experts now read the fused op's xn
        m.hidden = xn
    return True


def _hoist(nodes: list[fx.Node], before: fx.Node) -> None:
    """Move the computation of `nodes` (e.g. a norm weight computed as 1 + w, which torch.export
    may place after the residual sum) above `before`, where the fused op will read it. They read
    only parameters and constants, so moving them up keeps the graph topologically ordered."""
    position = {n: i for i, n in enumerate(before.graph.nodes)}
    late = {n for node in nodes for n in [node, *ancestors(node)] if position[n] >= position[before]}
    for n in sorted(late, key=position.get):
        before.prepend(n)


def _between(start: fx.Node, ends: set[fx.Node]) -> set[fx.Node]:
    """Every node on a path from `start` down to one of `ends` (the router: linear, softmax, topk...)."""
    above = set(ends).union(*(ancestors(e) for e in ends))
    return above & descendants([start])
