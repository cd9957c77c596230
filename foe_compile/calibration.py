"""Measuring a conversion on calibration inputs: the source's outputs before, FoE's after."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import FoEMoE
from .models.group_streams import stream_mean


def as_batches(inputs: Tensor | Iterable[Tensor] | None) -> list[Tensor]:
    """Token ids as a list of [B, T] batches (a [T] tensor is one sequence)."""
    if inputs is None:
        return []
    if isinstance(inputs, Tensor):
        inputs = [inputs]
    batches = [b if b.dim() == 2 else b.unsqueeze(0) for b in inputs]
    for b in batches:
        if b.dim() != 2 or b.dtype not in (torch.int32, torch.int64) or b.numel() == 0:
            raise ValueError(
                f"calibration_inputs must be non-empty integer token ids shaped [B, T] or [T]; "
                f"got dtype={b.dtype} shape={tuple(b.shape)}"
            )
    return batches


def as_example_inputs(inputs: Tensor | Iterable[Tensor] | None) -> list[Tensor]:
    """Positional example inputs for capturing a generic model (a tensor is one argument)."""
    if inputs is None:
        return []
    return [inputs] if isinstance(inputs, Tensor) else list(inputs)


@dataclass
class Trace:
    logits: list[Tensor]  # per batch, [B, T, V]
    hidden: dict[int, list[Tensor]]  # layer -> per batch [B, T, d] (model-level hidden state)


@torch.no_grad()
def trace(model: nn.Module, batches: list[Tensor]) -> Trace:
    """Run `model` on the batches, keeping logits and every decoder layer's output."""
    hidden: dict[int, list[Tensor]] = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out, i=i: hidden[i].append(stream_mean(out).float()))
        for i, layer in enumerate(model.model.layers)
    ]
    device = next(model.parameters()).device
    try:
        logits = [model(input_ids=b.to(device), use_cache=False).logits.float() for b in batches]
    finally:
        for h in hooks:
            h.remove()
    return Trace(logits, hidden)


def rel_error(a: list[Tensor], b: list[Tensor]) -> float:
    num = sum((x - y).double().pow(2).sum() for x, y in zip(a, b))
    den = sum(y.double().pow(2).sum() for y in b)
    return float((num / den).sqrt()) if den > 0 else float(num.sqrt())


def max_rel_error(a: list[Tensor], b: list[Tensor]) -> float:
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(y.abs().max()) for y in b)
    return diff / scale if scale > 0 else diff


def agreement_sums(probs: Tensor, ids: Tensor) -> tuple[float, float, int]:
    """For router probabilities [T, E] and the picks ids [T, k]: (sum over tokens of the fraction of
    the global top-k picked, sum of the picks' probability mass / the global top-k's, T)."""
    k = ids.shape[-1]
    top_vals, top_ids = probs.topk(k, dim=-1)
    kept = (ids.unsqueeze(-1) == top_ids.unsqueeze(-2)).any(-1).sum(-1)  # [T]
    return float(kept.sum()) / k, float((probs.gather(1, ids).sum(-1) / top_vals.sum(-1)).sum()), ids.shape[0]


@torch.no_grad()
def routing_stats(model: nn.Module, batches: list[Tensor]) -> tuple[Trace, dict[int, tuple[float, float]]]:
    """Trace the converted model and, per MoE layer, (agreement, probability mass kept) of its
    routing against the global top-k of the same router scores."""
    moe = {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, FoEMoE)}
    sums = {i: [0.0, 0.0, 0] for i in moe}

    def hook(i):
        def record(module: FoEMoE, _args, _out):
            probs, ids, _ = module.last_routing
            for j, value in enumerate(agreement_sums(probs, ids)):
                sums[i][j] += value
        return record

    hooks = []
    for i, m in moe.items():
        m.record = True
        hooks.append(m.register_forward_hook(hook(i)))
    try:
        result = trace(model, batches)
    finally:
        for i, m in moe.items():
            m.record, m.last_routing = False, None
        for h in hooks:
            h.remove()
    return result, {i: (a / n, p / n) for i, (a, p, n) in sums.items()}
