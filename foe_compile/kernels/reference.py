"""Plain-PyTorch references of the foe:: ops: obviously correct, slow, the ground truth that the
C++, CUDA and Triton kernels are tested against. Formulas:

sum_route_dispatch
    r        = mean_h(residual[h or 0] + partials[h])                 [T, d]
    xn       = RMSNorm(r) * norm_weight                                [T, d]
    logits   = F.linear(xn, router_weight, router_bias) in xn's dtype  [T, E]
    scores   = score(logits in fp32): softmax (over E) | sigmoid | sqrtsoftplus = sqrt(softplus)
    select   = scores + correction_bias (fp32) when given, else scores [T, E]
               group limit (n_group > 1): the E experts form n_group equal contiguous groups, a group's score
               is the sum of its top-2 `select` values; the experts outside the topk_group best groups
               (torch.topk's choice on ties) get `select` = -inf (0 with group_fill_zero, Mistral 4's
               spelling) (DeepSeek-V3, GLM-4.5, Nemotron-H, dots1, Solar Open; n_group = 1 changes nothing)
               topk_first: select = the logits (fp32) themselves (Mixtral, Llama 4: top-k on the logits)
    ids      = top-(k/H) of `select` in each of H equal expert blocks (H = 1: global top-k)
               FoE form (H > 1): the quota replaces a group limit, which needs n_group = 1 (each FoE
               group picks k/H of its own experts; the exact form, H = 1, computes the group limit)
    w        = scores[ids] (never the corrected `select`; with topk_first the score of the k picked logits:
               softmax over the k picks, sigmoid or sqrtsoftplus of each), divided by
               clamp(their sum over the k picks + renorm_eps, min=renorm_min) when `renormalize`
               (DeepSeek-V3 lineage: + 1e-20, LFM2: + 1e-6, Ernie 4.5: clamp at moe_norm_min),
               times `routed_scaling`, times expert_scale[ids] (fp32; Gemma 4's per-expert scale);
               cast to xn's dtype
               (Mixtral/Qwen: softmax; gpt-oss: softmax + router_bias; MiniMax-M2: sigmoid +
               correction_bias; DeepSeek-V3: sigmoid + correction_bias + group limit + renorm_eps +
               routed_scaling; DeepSeek-V4: sqrtsoftplus scores)
    pairs    = stable sort of the T*k (token, slot) pairs p = t*k + j by expert ids[t, j]
    offsets  = offsets[e] = first position of expert e in pairs, offsets[E] = T*k
experts_swiglu
    h        = gate_up[e] x_t (+ gate_up_bias[e])
    a        = unit(h): gated activations (gate_up [E, 2I, d], gate rows first, then up rows)
                 g, u = h[:I], h[I:];  with `limit`: g = min(g, limit), u = clamp(u, -limit, limit)
                 a = act(g) * (u + up_offset),  act = silu_alpha (g * sigmoid(alpha * g); alpha = 1
                 is SiLU), gelu (erf) or gelu_tanh
               ungated (gate_up [E, I, d]): relu2: a = relu(h)^2
    out[g(e), t] += w[t, j] * (down[e] a (+ down_bias[e]))   for every pick (t, j) of e,
    g(e) = e // (E / num_groups)
    with `weight_input` the routing weight scales the expert's input instead of its output:
    h = gate_up[e] (w[t, j] x_t) (+ gate_up_bias[e]), the product w x_t formed in x's dtype, and
    out[g(e), t] += down[e] a (+ down_bias[e])   (Llama 4)
    (Mixtral/Qwen/OLMoE: silu; Gemma 4: gelu_tanh; Nemotron-H: relu2; gpt-oss: silu with alpha 1.702,
    limit 7, up_offset 1 and biases; DeepSeek-V4, HY-V4, MiniMax-M3: silu with a limit)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face RMSNorm: normalise in fp32, scale in the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def route(probs: Tensor, num_groups: int, top_k: int) -> tuple[Tensor, Tensor]:
    """(values, ids) [T, k]: quota top-(k/H) per block, group h's picks in columns h*k/H..."""
    T, E = probs.shape
    block = E // num_groups
    values, local = torch.topk(probs.view(T, num_groups, block), top_k // num_groups, dim=-1)
    offsets = torch.arange(num_groups, device=probs.device).view(1, num_groups, 1) * block
    return values.reshape(T, top_k), (local + offsets).reshape(T, top_k)


def routing_weights(probs: Tensor, ids: Tensor, renormalize: bool, dtype: torch.dtype,
                    routed_scaling: float = 1.0, renorm_eps: float = 0.0, renorm_min: float = 0.0,
                    expert_scale: Tensor | None = None) -> Tensor:
    """The weights [T, k] of the picks `ids` from the scores `probs` [T, E] (see the module docstring)."""
    return picked_weights(probs.gather(1, ids), ids, renormalize, dtype, routed_scaling, renorm_eps, renorm_min,
                          expert_scale)


def picked_weights(values: Tensor, ids: Tensor, renormalize: bool, dtype: torch.dtype, routed_scaling: float = 1.0,
                   renorm_eps: float = 0.0, renorm_min: float = 0.0, expert_scale: Tensor | None = None) -> Tensor:
    """The weights [T, k] from the scores of the picks `values` [T, k] (fp32)."""
    if renormalize:
        total = values.sum(dim=-1, keepdim=True)
        if renorm_eps != 0.0:
            total = total + renorm_eps
        if renorm_min != 0.0:
            total = total.clamp(min=renorm_min)
        values = values / total
    if routed_scaling != 1.0:
        values = values * routed_scaling
    if expert_scale is not None:
        values = values * expert_scale.float()[ids]
    return values.to(dtype)


def limit_groups(select: Tensor, n_group: int, topk_group: int, fill_zero: bool = False) -> Tensor:
    """`select` [T, E] with the experts outside the topk_group best of n_group groups set to -inf (0 with
    fill_zero); a group scores the sum of its top-2 values (see the module docstring)."""
    T, E = select.shape
    group_scores = select.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, n_group]
    best = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    kept = torch.zeros_like(group_scores).scatter_(1, best, 1.0).bool()
    kept = kept.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    return select.masked_fill(~kept, 0.0 if fill_zero else float("-inf"))


SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")


def router_scores(logits: Tensor, scoring: str = "softmax") -> Tensor:
    """The fp32 expert scores [T, E] of the router logits (see the module docstring)."""
    logits = logits.float()
    if scoring == "softmax":
        return F.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    if scoring == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    raise ValueError(f"unknown router scoring {scoring!r}; foe::sum_route_dispatch computes {SCORINGS}")


def selection_scores(scores: Tensor, correction_bias: Tensor | None) -> Tensor:
    """What the experts are chosen by: the scores, plus the correction bias (fp32) when given."""
    return scores if correction_bias is None else scores + correction_bias.float()


def group_by_expert(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(pairs [T*k], offsets [E+1]): a stable sort of the flattened picks by expert.

    Spelled with ops every lowering translates (lower_experts puts it in graphs that are exported
    to ONNX, which has no stable sort): sorting the distinct keys id * N + position equals the
    stable sort by id, and the counts are a compare-and-sum against every expert id."""
    flat = ids.flatten()
    n = flat.numel()
    pairs = torch.sort(flat * n + torch.arange(n, device=ids.device)).indices
    counts = (flat.unsqueeze(1) == torch.arange(num_experts, device=ids.device)).sum(0)
    return pairs, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def sum_route_dispatch(residual: Tensor, partials: Tensor, norm_weight: Tensor, eps: float, router_weight: Tensor,
                       num_groups: int, top_k: int, renormalize: bool, scoring: str = "softmax",
                       router_bias: Tensor | None = None, correction_bias: Tensor | None = None,
                       routed_scaling: float = 1.0, n_group: int = 1, topk_group: int = 1, group_fill_zero: bool = False,
                       expert_scale: Tensor | None = None, renorm_eps: float = 0.0, renorm_min: float = 0.0,
                       topk_first: bool = False):
    r = (residual + partials).mean(0)
    xn = rms_norm(r, norm_weight, eps)
    logits = F.linear(xn, router_weight, router_bias)
    if topk_first:
        _, ids = route(logits.float(), num_groups, top_k)
        values = router_scores(logits.float().gather(1, ids), scoring)
    else:
        scores = router_scores(logits, scoring)
        select = selection_scores(scores, correction_bias)
        if n_group > 1:
            select = limit_groups(select, n_group, topk_group, group_fill_zero)
        _, ids = route(select, num_groups, top_k)
        values = scores.gather(1, ids)
    weights = picked_weights(values, ids, renormalize, xn.dtype, routed_scaling, renorm_eps, renorm_min, expert_scale)
    pairs, offsets = group_by_expert(ids, router_weight.shape[0])
    return r, xn, ids, weights, pairs, offsets


GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
UNGATED_ACTIVATIONS = ("relu2",)
ACTIVATIONS = GATED_ACTIVATIONS + UNGATED_ACTIVATIONS


def expert_unit(h: Tensor, activation: str = "silu", alpha: float = 1.0, limit: float | None = None,
                up_offset: float = 0.0) -> Tensor:
    """The expert's unit between its two projections (see the module docstring)."""
    if activation == "relu2":
        return torch.square(F.relu(h))
    gate, up = h.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    if activation == "silu":
        act = F.silu(gate) if alpha == 1.0 else gate * torch.sigmoid(gate * alpha)
    elif activation in ("gelu", "gelu_tanh"):
        act = F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none")
    else:
        raise ValueError(f"unknown expert activation {activation!r}; expected one of {ACTIVATIONS}")
    return act * (up + up_offset)


def experts_swiglu(x: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor, pairs: Tensor,
                   offsets: Tensor, num_groups: int, activation: str = "silu", gate_up_bias: Tensor | None = None,
                   down_bias: Tensor | None = None, alpha: float = 1.0, limit: float | None = None,
                   up_offset: float = 0.0, weight_input: bool = False) -> Tensor:
    T, k = ids.shape
    E = gate_up.shape[0]
    out = x.new_zeros(num_groups, T, x.shape[-1])
    bounds = offsets.tolist()
    for e in range(E):
        rows = pairs[bounds[e]:bounds[e + 1]]
        if rows.numel() == 0:
            continue
        token, slot = rows // k, rows % k
        w = weights[token, slot, None]
        h = F.linear(x[token] * w if weight_input else x[token], gate_up[e],
                     None if gate_up_bias is None else gate_up_bias[e])
        a = expert_unit(h, activation, alpha, limit, up_offset)
        y = F.linear(a, down[e], None if down_bias is None else down_bias[e])
        y = y if weight_input else y * w
        out[e // (E // num_groups)].index_add_(0, token, y.to(out.dtype))
    return out


def expert_activation(act) -> str | None:
    """The gated activation ("silu", "gelu", "gelu_tanh") that the callable `act` computes, judged by its
    values on float64 probes from -20 to 20 (so nn.SiLU, transformers' SiLUActivation, GELUActivation,
    GELUTanh, NewGELU... all qualify, whatever their spelling); None when it is none of them."""
    probe = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    try:
        with torch.no_grad():
            got = act(probe)
    except Exception:  # noqa: BLE001 - an activation that cannot run on a float64 vector is not one of ours
        return None
    for name, fn in (("silu", F.silu), ("gelu", F.gelu), ("gelu_tanh", lambda v: F.gelu(v, approximate="tanh"))):
        if isinstance(got, Tensor) and got.shape == probe.shape and torch.allclose(got, fn(probe), rtol=1e-9, atol=1e-12):
            return name
    return None
