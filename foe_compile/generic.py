"""The FX path of convert() for MoE models that are not a known Hugging Face class.

torch.export (non-strict) captures the model on the calibration inputs, the pass pipeline
applies the exact form (per-group attention partials, fused route/dispatch, foe:: experts)
or the FoE form (plus quota routing and one residual stream per group; see
passes/split_group_streams.py for how it treats shared experts and dense layers), and the
result is a GraphModule with the model's calling convention for those input shapes.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, fx, nn

from .calibration import max_rel_error, rel_error
from .capture import export_aten
from .comm import ep_volume, exact_volume, foe_volume
from .config import FoEConfig
from .families import FAMILIES
from .passes import run_passes
from .passes.matches import MOE_KEY
from .passes.partition_groups import GROUPS_KEY
from .report import CommunicationReport, ConversionReport, LayerReport


@torch.no_grad()
def convert_generic(model: nn.Module, config: FoEConfig, example: list[Tensor]) -> tuple[fx.GraphModule, ConversionReport]:
    name = type(model).__name__
    if config.expert_assignment != "contiguous":
        raise ValueError(f"{name} converts through the FX path, which supports expert_assignment='contiguous' only "
                         f"(got {config.expert_assignment!r}); the Hugging Face families support every assignment")
    if not example:
        raise ValueError(f"converting {name} through the FX path needs calibration_inputs (example inputs to capture)")
    start = time.perf_counter()
    args = tuple(example) if len(example) > 1 else (example[0],)
    # Hugging Face models capture without their KV cache.
    kwargs = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    gm = export_aten(model, args, kwargs).module()
    results = run_passes(gm, config.num_groups, config.mode, config.attn_stream_scale)
    blocks = gm.meta.get(MOE_KEY, [])
    if not blocks:
        raise ValueError(f"no MoE block found in {name}: the FX path needs a router (linear -> softmax -> topk) "
                         f"followed by SwiGLU experts; Hugging Face families converted directly: {sorted(FAMILIES)}")
    seconds = time.perf_counter() - start
    H = gm.meta[GROUPS_KEY]
    k, E, d = blocks[0].top_k, blocks[0].num_experts, int(blocks[0].hidden.meta["val"].shape[-1])
    layers = [LayerReport(i, "moe", exact=not reasons, reasons=reasons,
                          notes=[f"{b.kind} experts lowered to foe::experts_swiglu"])
              for i, (b, reasons) in enumerate(zip(blocks, _approximations(blocks, H, config)))]
    report = ConversionReport(
        model_type=name, mode=config.mode, num_groups=H, num_experts=E, top_k=k, expert_assignment="contiguous",
        attn_stream_scale=config.attn_stream_scale, conversion_seconds=seconds, layers=layers,
        communication=CommunicationReport(config.report_gpus, d, len(blocks), ep_volume(k, config.report_gpus),
                                          foe_volume(k, H, config.report_gpus), exact_volume(k, H, config.report_gpus)),
    )
    gm.meta["foe_pass_results"] = results
    reference, converted = model(*args, **kwargs), gm(*args, **kwargs)
    report.logits_rel_error = rel_error([converted], [reference])
    report.logits_max_rel_error = max_rel_error([converted], [reference])
    return gm, report


def _approximations(blocks: list, H: int, config: FoEConfig) -> list[list[str]]:
    """Per MoE block (one per layer), why the FoE form differs from the source there."""
    if config.mode == "exact" or H == 1:
        return [[] for _ in blocks]
    c = H if config.attn_stream_scale is None else config.attn_stream_scale
    reasons = []
    for i, block in enumerate(blocks):
        why = [f"quota routing: top-{block.top_k // H} in each of {H} blocks of {block.num_experts // H} experts, "
               f"not global top-{block.top_k}"]
        if i > 0 and blocks[i - 1].feeds_group_streams:
            why.append(f"group streams: attention reads r + {c:g}*m_h, the source r + sum_h m_h")
        reasons.append(why)
    return reasons
