"""The op boundary: foe::sum_route_dispatch and foe::experts_swiglu (DESIGN.md "The op boundary").

Each op has a schema, a fake (meta) implementation for compile/export, the plain-PyTorch
reference registered as CompositeExplicitAutograd (every device; faster kernels override it
per dispatch key: C++ for CPU, CUDA/Triton for CUDA) and an autograd formula. Formulas are
in `reference.py`. Shapes are static at the boundary: per-expert counts live inside.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference

# The expert's variants: its unit (reference.expert_unit) and whether the routing weight scales its input
# (weight_input, Llama 4) rather than its output; the defaults are SiLU SwiGLU without biases, weighted output.
UNIT_SCHEMA = ('str activation="silu", Tensor? gate_up_bias=None, Tensor? down_bias=None, float alpha=1.0, '
               'float? limit=None, float up_offset=0.0, bool weight_input=False')
# The router's variants (reference.sum_route_dispatch); the defaults are softmax scores without biases.
ROUTE_SCHEMA = ('str scoring="softmax", Tensor? router_bias=None, Tensor? correction_bias=None, '
                'float routed_scaling=1.0, int n_group=1, int topk_group=1, bool group_fill_zero=False, '
                'Tensor? expert_scale=None, float renorm_eps=0.0, float renorm_min=0.0, bool topk_first=False')
# The variant arguments that change the weights of fixed picks (the backward op's, after routed_scaling).
WEIGHT_SCHEMA = 'Tensor? expert_scale=None, float renorm_eps=0.0, float renorm_min=0.0, bool topk_first=False'
LIB = torch.library.Library("foe", "DEF")  # noqa: TOR901 - the namespace is ours
LIB.define(
    "sum_route_dispatch(Tensor residual, Tensor partials, Tensor norm_weight, float eps, Tensor router_weight, "
    "int num_groups, int top_k, bool renormalize, " + ROUTE_SCHEMA + ") -> (Tensor r, Tensor xn, Tensor topk_ids, Tensor topk_weights, "
    "Tensor sorted_pairs, Tensor expert_offsets)"
)
LIB.define(
    "experts_swiglu(Tensor x, Tensor gate_up, Tensor down, Tensor topk_ids, Tensor topk_weights, "
    "Tensor sorted_pairs, Tensor expert_offsets, int num_groups, " + UNIT_SCHEMA + ") -> Tensor"
)
# Backward ops: opaque recompute-based gradients (see _recompute_grads).
LIB.define(
    "sum_route_dispatch_backward(Tensor grad_r, Tensor grad_xn, Tensor grad_weights, Tensor residual, "
    "Tensor partials, Tensor norm_weight, float eps, Tensor router_weight, Tensor topk_ids, bool renormalize, "
    'str scoring="softmax", Tensor? router_bias=None, float routed_scaling=1.0, ' + WEIGHT_SCHEMA + ") "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "experts_swiglu_backward(Tensor grad_out, Tensor x, Tensor gate_up, Tensor down, Tensor topk_ids, "
    "Tensor topk_weights, Tensor sorted_pairs, Tensor expert_offsets, int num_groups, " + UNIT_SCHEMA + ") "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def check_route_args(residual: Tensor, partials: Tensor, norm_weight: Tensor, router_weight: Tensor,
                     num_groups: int, top_k: int, *variant) -> None:
    torch._check(partials.dim() == 3 and residual.dim() == 3,
                 lambda: f"residual/partials must be [H, T, d], got {tuple(residual.shape)}, {tuple(partials.shape)}")
    torch._check(residual.shape[0] in (1, partials.shape[0]) and residual.shape[1:] == partials.shape[1:],
                 lambda: f"residual {tuple(residual.shape)} must be [1 or H, T, d] with partials {tuple(partials.shape)}")
    E, d = router_weight.shape
    torch._check(d == partials.shape[-1] and norm_weight.shape == (d,),
                 lambda: f"router_weight [E, d] / norm_weight [d] do not match hidden size {partials.shape[-1]}")
    torch._check(num_groups >= 1 and E % num_groups == 0 and top_k % num_groups == 0 and top_k <= E,
                 lambda: f"need E={E} and top_k={top_k} divisible by num_groups={num_groups}, top_k <= E")
    check_route_variant(router_weight, *variant)
    n_group = variant[4] if len(variant) > 4 else 1
    torch._check(num_groups == 1 or n_group == 1, lambda: (
        f"a group limit (n_group={n_group}) needs num_groups=1: in the FoE form the quota of k/H picks per "
        "block replaces it (pass n_group=1)"))


def check_route_variant(router_weight: Tensor, scoring: str = "softmax", router_bias: Tensor | None = None,
                        correction_bias: Tensor | None = None, routed_scaling: float = 1.0, n_group: int = 1,
                        topk_group: int = 1, group_fill_zero: bool = False, expert_scale: Tensor | None = None,
                        renorm_eps: float = 0.0, renorm_min: float = 0.0, topk_first: bool = False) -> None:
    """The router-variant arguments (ValueError, saying what to change): a known scoring, biases and
    expert_scale [E] on the router's device, router_bias in the router's dtype (it is added in F.linear),
    correction_bias and expert_scale in the router's dtype or float32 (they meet fp32 values), a finite
    routed_scaling, n_group dividing E into groups of >= 2 experts with 1 <= topk_group <= n_group, finite
    renorm_eps / renorm_min >= 0, and topk_first without a correction bias or group limit (it selects on
    the logits)."""
    check_group_limit(router_weight.shape[0], n_group, topk_group)
    for name, value in (("renorm_eps", renorm_eps), ("renorm_min", renorm_min)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if topk_first and (correction_bias is not None or n_group > 1):
        raise ValueError("topk_first selects on the logits: it takes no correction_bias and no group limit (n_group=1)")
    if expert_scale is not None:
        _check_expert_vector("expert_scale", expert_scale, router_weight, (router_weight.dtype, torch.float32))
    if scoring not in reference.SCORINGS:
        raise ValueError(f"unknown router scoring {scoring!r}; foe::sum_route_dispatch computes {reference.SCORINGS}")
    if not math.isfinite(routed_scaling):
        raise ValueError(f"routed_scaling must be finite, got {routed_scaling}")
    for name, bias, dtypes in (("router_bias", router_bias, (router_weight.dtype,)),
                               ("correction_bias", correction_bias, (router_weight.dtype, torch.float32))):
        if bias is not None:
            _check_expert_vector(name, bias, router_weight, dtypes)


def check_group_limit(num_experts: int, n_group: int, topk_group: int) -> None:
    """ValueError unless n_group splits the experts into groups of >= 2 (a group scores its top 2) and
    1 <= topk_group <= n_group; n_group = 1 is no limit."""
    if n_group == 1:
        return
    if n_group < 1 or num_experts % n_group or num_experts // n_group < 2:
        raise ValueError(f"n_group={n_group} must split the {num_experts} experts into equal groups of at least 2")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")


def _check_expert_vector(name: str, t: Tensor, router_weight: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    E = router_weight.shape[0]
    if t.dim() != 1 or t.shape[0] != E:
        raise ValueError(f"{name} must be [E] = [{E}], got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dict.fromkeys(dtypes)))}, got {t.dtype}: "
                         f"cast it with .to(...)")
    if t.device != router_weight.device:
        raise ValueError(f"{name} must be on router_weight's device {router_weight.device}, got {t.device}")


def check_experts_args(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, pairs: Tensor, offsets: Tensor,
                       num_groups: int, activation: str = "silu", gate_up_bias: Tensor | None = None,
                       down_bias: Tensor | None = None, alpha: float = 1.0, limit: float | None = None,
                       up_offset: float = 0.0, weight_input: bool = False) -> None:
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}; foe::experts_swiglu computes {reference.ACTIVATIONS}")
    gated = activation in reference.GATED_ACTIVATIONS
    if alpha != 1.0 and activation != "silu":
        raise ValueError(f"alpha={alpha} applies to the silu unit only (g * sigmoid(alpha * g)), not {activation!r}")
    if not gated and (limit is not None or up_offset != 0.0):
        raise ValueError(f"limit/up_offset apply to gated units only, not {activation!r}")
    if limit is not None and not limit == limit:  # NaN
        raise ValueError("limit is NaN")
    E, rows, d = gate_up.shape
    inner = rows // 2 if gated else rows
    torch._check(x.dim() == 2 and x.shape[1] == d, lambda: f"x must be [T, {d}], got {tuple(x.shape)}")
    torch._check(not gated or rows % 2 == 0, lambda: f"gated unit needs gate_up [E, 2I, d], got {tuple(gate_up.shape)}")
    torch._check(down.shape == (E, d, inner),
                 lambda: f"down must be [E, d, I] = {(E, d, inner)}, got {tuple(down.shape)}")
    torch._check(gate_up_bias is None or gate_up_bias.shape == (E, rows),
                 lambda: f"gate_up_bias must be [E, {rows}], got {tuple(gate_up_bias.shape)}")
    torch._check(down_bias is None or down_bias.shape == (E, d),
                 lambda: f"down_bias must be [E, {d}], got {tuple(down_bias.shape)}")
    torch._check(ids.shape[0] == x.shape[0] and pairs.numel() == ids.numel() and offsets.numel() == E + 1,
                 lambda: "topk_ids [T, k], sorted_pairs [T*k] and expert_offsets [E+1] disagree")
    torch._check(E % num_groups == 0, lambda: f"E={E} is not divisible by num_groups={num_groups}")


@torch.library.register_fake("foe::sum_route_dispatch")
def _(residual, partials, norm_weight, eps, router_weight, num_groups, top_k, renormalize, *variant):
    check_route_args(residual, partials, norm_weight, router_weight, num_groups, top_k, *variant)
    T, d = partials.shape[1:]
    E = router_weight.shape[0]
    ids = partials.new_empty(T, top_k, dtype=torch.int64)
    return (partials.new_empty(T, d), partials.new_empty(T, d), ids, partials.new_empty(T, top_k),
            partials.new_empty(T * top_k, dtype=torch.int64), partials.new_empty(E + 1, dtype=torch.int64))


@torch.library.register_fake("foe::experts_swiglu")
def _(x, gate_up, down, ids, weights, pairs, offsets, num_groups, *unit):
    check_experts_args(x, gate_up, down, ids, pairs, offsets, num_groups, *unit)
    return x.new_empty(num_groups, x.shape[0], x.shape[1])


@torch.library.impl("foe::sum_route_dispatch", "CompositeExplicitAutograd")
def _(residual, partials, norm_weight, eps, router_weight, num_groups, top_k, renormalize, *variant):
    check_route_args(residual, partials, norm_weight, router_weight, num_groups, top_k, *variant)
    return reference.sum_route_dispatch(residual, partials, norm_weight, eps, router_weight, num_groups, top_k,
                                        renormalize, *variant)


@torch.library.impl("foe::experts_swiglu", "CompositeExplicitAutograd")
def _(x, gate_up, down, ids, weights, pairs, offsets, num_groups, *unit):
    check_experts_args(x, gate_up, down, ids, pairs, offsets, num_groups, *unit)
    return reference.experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, num_groups, *unit)


# ---- autograd: gradients by recomputing the differentiable part of the reference -------------

def _recompute_grads(fn, inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        outputs = fn(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # Empty inputs (T = 0) give outputs that never touched the leaves: zero gradients.
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        result = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                     allow_unused=True) if pairs else (None,) * len(leaves)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, result))


@torch.library.impl("foe::sum_route_dispatch_backward", "CompositeExplicitAutograd")
def _(grad_r, grad_xn, grad_weights, residual, partials, norm_weight, eps, router_weight, ids, renormalize,
      scoring="softmax", router_bias=None, routed_scaling=1.0, expert_scale=None, renorm_eps=0.0, renorm_min=0.0,
      topk_first=False):
    # Absent router bias / expert scale get stand-ins [E] (zeros / ones; their gradients are dropped); the
    # correction bias and the group limit only choose the experts, which are fixed here (ids): no gradient.
    router_bias_ = router_weight.new_zeros(router_weight.shape[:1]) if router_bias is None else router_bias
    expert_scale_ = expert_scale
    if expert_scale is None:
        expert_scale_ = router_weight.new_ones(router_weight.shape[:1], dtype=torch.float32)

    def forward(res, par, nw, rw, rb, es):  # the routed picks are fixed: gradients flow through their weights
        r = (res + par).mean(0)
        xn = reference.rms_norm(r, nw, eps)
        logits = torch.nn.functional.linear(xn, rw, rb)
        values = (reference.router_scores(logits.float().gather(1, ids), scoring) if topk_first else
                  reference.router_scores(logits, scoring).gather(1, ids))
        return r, xn, reference.picked_weights(values, ids, renormalize, xn.dtype, routed_scaling, renorm_eps,
                                               renorm_min, None if expert_scale is None else es)

    return _recompute_grads(forward, (residual, partials, norm_weight, router_weight, router_bias_, expert_scale_),
                            (grad_r, grad_xn, grad_weights))


@torch.library.register_fake("foe::sum_route_dispatch_backward")
def _(grad_r, grad_xn, grad_weights, residual, partials, norm_weight, eps, router_weight, ids, renormalize,
      scoring="softmax", router_bias=None, routed_scaling=1.0, expert_scale=None, *weight_variant):
    return (torch.empty_like(residual), torch.empty_like(partials), torch.empty_like(norm_weight),
            torch.empty_like(router_weight), router_weight.new_empty(router_weight.shape[:1]),
            router_weight.new_empty(router_weight.shape[:1]) if expert_scale is None else torch.empty_like(expert_scale))


@torch.library.impl("foe::experts_swiglu_backward", "CompositeExplicitAutograd")
def _(grad_out, x, gate_up, down, ids, weights, pairs, offsets, num_groups, activation="silu", gate_up_bias=None,
      down_bias=None, alpha=1.0, limit=None, up_offset=0.0, weight_input=False):
    # Absent biases get zero stand-ins ([E, 0] would not broadcast): their gradients are dropped.
    gate_up_bias_ = gate_up.new_zeros(gate_up.shape[:2]) if gate_up_bias is None else gate_up_bias
    down_bias_ = down.new_zeros(down.shape[:2]) if down_bias is None else down_bias

    def forward(x_, gu, dn, w, gub, db):
        return reference.experts_swiglu(x_, gu, dn, ids, w, pairs, offsets, num_groups, activation, gub, db, alpha,
                                        limit, up_offset, weight_input)

    return _recompute_grads(forward, (x, gate_up, down, weights, gate_up_bias_, down_bias_), (grad_out,))


@torch.library.register_fake("foe::experts_swiglu_backward")
def _(grad_out, x, gate_up, down, ids, weights, pairs, offsets, num_groups, *unit):
    return (torch.empty_like(x), torch.empty_like(gate_up), torch.empty_like(down), torch.empty_like(weights),
            x.new_empty(gate_up.shape[:2]), x.new_empty(down.shape[:2]))


ROUTE_DEFAULTS = ("softmax", None, None, 1.0, 1, 1, False, None, 0.0, 0.0, False)  # ROUTE_SCHEMA's defaults


def _route_setup(ctx, inputs, output):
    residual, partials, norm_weight, eps, router_weight, _, _, renormalize, *variant = inputs
    (scoring, router_bias, _, routed_scaling, _, _, _, expert_scale, renorm_eps, renorm_min,
     topk_first) = list(variant) + list(ROUTE_DEFAULTS[len(variant):])
    ctx.save_for_backward(residual, partials, norm_weight, router_weight, output[2], router_bias, expert_scale)
    ctx.eps, ctx.renormalize, ctx.scoring, ctx.routed_scaling = eps, renormalize, scoring, routed_scaling
    ctx.weight_variant = (renorm_eps, renorm_min, topk_first)


def _route_backward(ctx, grad_r, grad_xn, _ids, grad_weights, _pairs, _offsets):
    residual, partials, norm_weight, router_weight, ids, router_bias, expert_scale = ctx.saved_tensors
    zeros = lambda t, like: t if t is not None else torch.zeros_like(like)  # noqa: E731
    g = torch.ops.foe.sum_route_dispatch_backward(
        zeros(grad_r, partials[0]), zeros(grad_xn, partials[0]),
        zeros(grad_weights, ids.to(partials.dtype)), residual, partials, norm_weight, ctx.eps, router_weight, ids,
        ctx.renormalize, ctx.scoring, router_bias, ctx.routed_scaling, expert_scale, *ctx.weight_variant)
    # inputs: residual, partials, norm_weight, eps, router_weight, num_groups, top_k, renormalize, scoring,
    # router_bias, correction_bias (selects only: no gradient), routed_scaling, n_group, topk_group,
    # group_fill_zero (select only), expert_scale, renorm_eps, renorm_min, topk_first
    return (g[0], g[1], g[2], None, g[3], None, None, None, None, g[4] if router_bias is not None else None, None,
            None, None, None, None, g[5] if expert_scale is not None else None, None, None, None)


def _experts_setup(ctx, inputs, output):
    x, gate_up, down, ids, weights, pairs, offsets, num_groups, activation, gate_up_bias, down_bias, *rest = inputs
    ctx.save_for_backward(x, gate_up, down, ids, weights, pairs, offsets, gate_up_bias, down_bias)
    ctx.num_groups, ctx.activation, ctx.scalars = num_groups, activation, rest  # alpha, limit, up_offset, weight_input


def _experts_backward(ctx, grad_out):
    x, gate_up, down, ids, weights, pairs, offsets, gate_up_bias, down_bias = ctx.saved_tensors
    gx, ggu, gd, gw, g_gate_up_bias, g_down_bias = torch.ops.foe.experts_swiglu_backward(
        grad_out, x, gate_up, down, ids, weights, pairs, offsets, ctx.num_groups, ctx.activation, gate_up_bias,
        down_bias, *ctx.scalars)
    return (gx, ggu, gd, None, gw, None, None, None, None, g_gate_up_bias if gate_up_bias is not None else None,
            g_down_bias if down_bias is not None else None, None, None, None, None)


torch.library.register_autograd("foe::sum_route_dispatch", _route_backward, setup_context=_route_setup)
torch.library.register_autograd("foe::experts_swiglu", _experts_backward, setup_context=_experts_setup)
