"""ONNX export: the foe:: ops as standard ONNX (opset 18) subgraphs, checked in onnxruntime.

`to_onnx(model, inputs, path)` captures the model like the FX path (torch.export, batch and
sequence symbolic) and translates it with torch.onnx's exporter; the two foe:: ops are given as
onnxscript functions that spell out reference.py's formulas with standard operators, so the
file needs no custom-op library (tested in onnxruntime's CPU provider, fp32 and fp16; it has
no bf16 kernels for several standard ops, so bf16 files do not run there):

    sum_route_dispatch  ReduceMean over groups, RMSNorm, MatMul (+ router bias), the scores
                        (Softmax, Sigmoid or Sqrt(Softplus)), TopK per expert block (quota
                        routing) of the scores (+ correction bias; group limit: TopK of the
                        groups' top-2 sums, Where over the others; topk_first: of the logits),
                        GatherElements of the picked scores (topk_first: the score of the
                        picked logits), renormalisation (+ eps, at least min), scaling, Gather
                        of the expert scales; the stable grouping by expert is a
                        TopK over the keys id * N + position (N = T*k); offsets = CumSum of
                        the per-expert counts
    experts_swiglu      one unrolled step per expert (E is static): the expert's rows of the
                        grouping (a Slice between two offsets), Gather of their tokens, two
                        Gemms (+ biases) around the unit (SiLU/GELU/GELU-tanh gated with the
                        optional clamp and up offset, or ReLU²), the routing-weight multiply (of
                        the output; of the gathered input rows with weight_input) and a
                        ScatterND-add into its group's output (a token meets each expert at
                        most once)
"""
from __future__ import annotations

import os

import torch
from onnxscript import opset18 as op
from torch import Tensor, nn

from ..capture import capture_kwargs, export_aten

FLOAT, INT64, BOOL = 1, 7, 9  # onnx.TensorProto data types


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _range(stop):
    """0, 1, ..., stop - 1 for a 1-element int64 tensor `stop`."""
    return op.Range(op.Constant(value_int=0), op.Squeeze(stop), op.Constant(value_int=1))


def _score(logits, scoring: str):
    if scoring == "softmax":
        return op.Softmax(logits, axis=-1)
    if scoring == "sigmoid":
        return op.Sigmoid(logits)
    if scoring == "sqrtsoftplus":
        return op.Sqrt(op.Softplus(logits))
    raise ValueError(f"unknown router scoring {scoring!r}")


def _limit_groups(select, n_group: int, topk_group: int, fill_zero: bool):
    """reference.limit_groups: the experts outside the topk_group best groups (top-2 sums) get -inf (or 0)."""
    grouped = op.Reshape(select, _ints(0, n_group, -1))  # [T, n_group, E/n_group]
    top2, _ = op.TopK(grouped, _ints(2), axis=-1, largest=1, sorted=1)
    group_scores = op.ReduceSum(top2, _ints(-1), keepdims=0)  # [T, n_group]
    _, best = op.TopK(group_scores, _ints(topk_group), axis=-1, largest=1, sorted=1)
    kept = op.ScatterElements(op.Expand(op.Constant(value_float=0.0), op.Shape(group_scores)), best,
                              op.Expand(op.Constant(value_float=1.0), op.Shape(best)), axis=-1)
    kept = op.Cast(op.Unsqueeze(kept, _ints(-1)), to=BOOL)  # [T, n_group, 1]
    kept = op.Reshape(op.Expand(kept, op.Shape(grouped)), op.Shape(select))  # [T, E]
    return op.Where(kept, select, op.Constant(value_float=0.0 if fill_zero else float("-inf")))


def sum_route_dispatch(residual, partials, norm_weight, eps: float, router_weight, num_groups: int, top_k: int,
                       renormalize: bool, scoring: str = "softmax", router_bias=None, correction_bias=None,
                       routed_scaling: float = 1.0, n_group: int = 1, topk_group: int = 1, group_fill_zero: bool = False,
                       expert_scale=None, renorm_eps: float = 0.0, renorm_min: float = 0.0, topk_first: bool = False):
    r = op.ReduceMean(op.Add(residual, partials), _ints(0), keepdims=0)
    x32 = op.Cast(r, to=FLOAT)  # normalised in fp32, scaled in the input dtype (reference.rms_norm)
    mean_sq = op.ReduceMean(op.Mul(x32, x32), _ints(-1), keepdims=1)
    normed = op.Div(x32, op.Sqrt(op.Add(mean_sq, op.Constant(value_float=eps))))
    xn = op.Mul(norm_weight, op.CastLike(normed, r))
    logits = op.MatMul(xn, op.Transpose(router_weight, perm=[1, 0]))
    if router_bias is not None:
        logits = op.Add(logits, router_bias)  # in the dtype, as F.linear's bias
    logits = op.Cast(logits, to=FLOAT)
    num_experts = op.Shape(router_weight, start=0, end=1)
    if topk_first:
        probs = select = logits
    else:
        probs = _score(logits, scoring)
        select = probs if correction_bias is None else op.Add(probs, op.Cast(correction_bias, to=FLOAT))
        if n_group > 1:
            select = _limit_groups(select, n_group, topk_group, group_fill_zero)
    block = op.Div(num_experts, _ints(num_groups))
    blocks = op.Reshape(probs, op.Concat(_ints(-1, num_groups), block, axis=0))  # [T, H, E/H]
    if select is probs:
        values, local = op.TopK(blocks, _ints(top_k // num_groups), axis=-1, largest=1, sorted=1)
    else:  # the selection (corrected, group-limited) chooses the experts; the weights are the scores themselves
        select = op.Reshape(select, op.Concat(_ints(-1, num_groups), block, axis=0))
        _, local = op.TopK(select, _ints(top_k // num_groups), axis=-1, largest=1, sorted=1)
        values = op.GatherElements(blocks, local, axis=-1)
    first_id = op.Mul(op.Reshape(_range(_ints(num_groups)), _ints(1, -1, 1)), block)
    ids = op.Reshape(op.Add(local, first_id), _ints(-1, top_k))
    values = op.Reshape(values, _ints(-1, top_k))
    if topk_first:  # the picked logits -> their scores (softmax over the k picks)
        values = _score(values, scoring)
    if renormalize:
        total = op.ReduceSum(values, _ints(-1), keepdims=1)
        if renorm_eps != 0.0:
            total = op.Add(total, op.Constant(value_float=renorm_eps))
        if renorm_min != 0.0:  # clamp(min=...), a NaN total staying NaN
            minimum = op.Constant(value_float=renorm_min)
            total = op.Where(op.Less(total, minimum), minimum, total)
        values = op.Div(values, total)
    if routed_scaling != 1.0:
        values = op.Mul(values, op.Constant(value_float=routed_scaling))
    if expert_scale is not None:
        values = op.Mul(values, op.Gather(op.Cast(expert_scale, to=FLOAT), ids, axis=0))
    flat = op.Reshape(ids, _ints(-1))
    count = op.Shape(flat)
    key = op.Add(op.Mul(flat, count), _range(count))
    _, pairs = op.TopK(key, count, axis=0, largest=0, sorted=1)  # ascending keys: a stable sort by expert
    hits = op.Cast(op.Equal(op.Unsqueeze(flat, _ints(1)), _range(num_experts)), to=INT64)
    per_expert = op.ReduceSum(hits, _ints(0), keepdims=0)
    offsets = op.Concat(_ints(0), op.CumSum(per_expert, op.Constant(value_int=0)), axis=0)
    return r, xn, ids, op.CastLike(values, xn), pairs, offsets


def _unit(h, activation: str, alpha: float, limit, up_offset: float):
    """reference.expert_unit in standard operators (opset 18 has no Gelu: GELU is spelled out)."""
    def const(value: float):
        return op.CastLike(op.Constant(value_float=value), h)

    if activation == "relu2":
        r = op.Relu(h)
        return op.Mul(r, r)
    gate, up = op.Split(h, axis=-1, num_outputs=2)
    if limit is not None:
        gate = op.Min(gate, const(limit))
        up = op.Clip(up, const(-limit), const(limit))
    if activation == "silu":
        act = op.Mul(gate, op.Sigmoid(gate if alpha == 1.0 else op.Mul(gate, const(alpha))))
    elif activation == "gelu":  # 0.5 g (1 + erf(g / sqrt 2))
        act = op.Mul(op.Mul(const(0.5), gate), op.Add(const(1.0), op.Erf(op.Mul(gate, const(0.5 ** 0.5)))))
    else:  # gelu_tanh: 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))
        inner = op.Mul(const((2.0 / 3.141592653589793) ** 0.5),
                       op.Add(gate, op.Mul(const(0.044715), op.Mul(gate, op.Mul(gate, gate)))))
        act = op.Mul(op.Mul(const(0.5), gate), op.Add(const(1.0), op.Tanh(inner)))
    return op.Mul(act, op.Add(up, const(up_offset)) if up_offset != 0.0 else up)


def experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, num_groups: int, activation: str = "silu",
                   gate_up_bias=None, down_bias=None, alpha: float = 1.0, limit: float | None = None,
                   up_offset: float = 0.0, weight_input: bool = False):
    num_experts = gate_up.shape[0]
    per_group = num_experts // num_groups
    top_k = op.Shape(ids, start=1, end=2)
    # fp32 accumulators [T, d]: onnxruntime's ScatterND-add has no fp16 kernel; rounded to x's dtype once at the end
    out = [op.Mul(op.Cast(x, to=FLOAT), op.Constant(value_float=0.0)) for _ in range(num_groups)]
    for e in range(num_experts):
        rows = op.Slice(pairs, op.Slice(offsets, _ints(e), _ints(e + 1)), op.Slice(offsets, _ints(e + 1), _ints(e + 2)))
        token, slot = op.Div(rows, top_k), op.Mod(rows, top_k)
        expert = op.Constant(value_int=e)
        w = op.Unsqueeze(op.GatherND(weights, op.Concat(op.Unsqueeze(token, _ints(-1)), op.Unsqueeze(slot, _ints(-1)),
                                                       axis=-1)), _ints(-1))  # [n, 1]
        rows = op.Gather(x, token, axis=0)
        hidden = op.Gemm(op.Mul(rows, w) if weight_input else rows, op.Gather(gate_up, expert, axis=0), transB=1)
        if gate_up_bias is not None:
            hidden = op.Add(hidden, op.Gather(gate_up_bias, expert, axis=0))
        y = op.Gemm(_unit(hidden, activation, alpha, limit, up_offset), op.Gather(down, expert, axis=0), transB=1)
        if down_bias is not None:
            y = op.Add(y, op.Gather(down_bias, expert, axis=0))
        g = e // per_group
        update = op.Cast(y if weight_input else op.Mul(y, w), to=FLOAT)
        out[g] = op.ScatterND(out[g], op.Unsqueeze(token, _ints(-1)), update, reduction="add")
    return op.CastLike(op.Concat(*[op.Unsqueeze(o, _ints(0)) for o in out], axis=0), x)


TRANSLATIONS = {
    torch.ops.foe.sum_route_dispatch.default: sum_route_dispatch,
    torch.ops.foe.experts_swiglu.default: experts_swiglu,
}


def to_onnx(model: nn.Module, inputs: tuple[Tensor, ...] | Tensor, path: str | os.PathLike) -> str:
    """Export `model` (converted or not: the foe:: ops it reaches are translated) to ONNX at `path`."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    program = export_aten(model, args, capture_kwargs(model), dynamic=True)
    onnx_program = torch.onnx.export(program, custom_translation_table=TRANSLATIONS, dynamo=True)
    onnx_program.save(os.fspath(path))
    return os.fspath(path)
