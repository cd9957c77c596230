"""convert(): a Hugging Face MoE model -> its Federation-of-Experts (or exact) form."""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from . import assignment
from .build import replace_layers
from .calibration import as_batches, as_example_inputs, max_rel_error, rel_error, routing_stats, trace
from .comm import ep_volume, exact_volume, foe_volume
from .config import FoEConfig
from .families import Family, family_of, is_supported_family
from .generic import convert_generic
from .report import CommunicationReport, ConversionReport, LayerReport, quota_reason, stream_reason
from .serialization import is_converted, mark_converted
from .shape import ModelShape


def convert(
    model: nn.Module,
    config: FoEConfig | None = None,
    *,
    calibration_inputs: Tensor | Iterable[Tensor] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Convert a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE causal LM in place, per instance.

    Any other MoE model goes through the FX path (foe_compile/generic.py): captured with
    torch.export on `calibration_inputs`, rewritten by the passes to the requested form,
    returned as a GraphModule.

    Weights become views of the source's (zero-copy; a calibrated expert permutation copies
    the experts it moves); works on the meta device. Keyword overrides update `config`.
    With `calibration_inputs` (token ids), the report measures routing agreement and the
    error of hidden states and logits against the source; "calibrated" assignment needs them.

    Example:
        >>> from transformers import Qwen3MoeForCausalLM
        >>> from foe_compile import builtin_config, convert
        >>> model = Qwen3MoeForCausalLM(builtin_config("qwen3-moe-tiny"))
        >>> model, report = convert(model, mode="exact")
        >>> report.exact
        True
    """
    config = (config or FoEConfig()).replace(**overrides)
    if not is_supported_family(model):
        return convert_generic(model, config, as_example_inputs(calibration_inputs))
    family = family_of(model)
    if is_converted(model):
        raise ValueError(f"{type(model).__name__} is already converted; convert the source model instead")
    shape = ModelShape.of(model, family)
    batches = as_batches(calibration_inputs)
    source = trace(model, batches) if batches else None

    start = time.perf_counter()
    config = resolve(model, shape, config, batches)
    replace_layers(model, family, shape, config)
    mark_converted(model, config)
    seconds = time.perf_counter() - start

    return model, build_report(model, family, shape, config, seconds, source, batches)


def resolve(model: nn.Module, shape: ModelShape, config: FoEConfig, batches: list[Tensor]) -> FoEConfig:
    """Fix H and every MoE layer's expert permutation (validating the request)."""
    H = shape.resolve_group_count(config)
    c = config.attn_stream_scale
    if c is not None and not 1 <= c <= H:
        raise ValueError(f"attn_stream_scale must lie in [1, H={H}], got {c}")
    E, chosen = shape.num_experts, config.expert_assignment
    if config.layer_assignments:  # loading a saved conversion
        perms = {i: assignment.check_permutation(config.layer_assignments[i], E) for i in shape.moe_layers}
    elif chosen == "contiguous":
        perms = {i: assignment.contiguous(E) for i in shape.moe_layers}
    elif chosen == "calibrated":
        if not batches:
            raise ValueError("expert_assignment='calibrated' needs calibration_inputs (token ids [B, T])")
        counts = assignment.co_selection_counts(model, list(shape.moe_layers), batches)
        perms = {i: assignment.calibrated(counts[i], H) for i in shape.moe_layers}
    else:
        perm = assignment.check_permutation(chosen, E)
        perms = {i: perm for i in shape.moe_layers}
    return config.replace(num_groups=H, layer_assignments=perms)


def layer_reasons(i: int, shape: ModelShape, family: Family, config: FoEConfig) -> tuple[list[str], list[str]]:
    """(why layer i is approximate, exact facts worth noting)."""
    H, k, E = config.num_groups, shape.top_k, shape.num_experts
    reasons, notes = [], []
    if config.mode == "foe" and H > 1:
        if i in shape.moe_layers:
            reasons.append(quota_reason(k, H, E))
        c = H if config.attn_stream_scale is None else config.attn_stream_scale
        if i > 0:
            reasons.append(stream_reason(c))
    if family.qk_norm == "full_width" and H > 1:
        notes.append("q/k RMSNorm spans all heads: one extra cross-group sum-of-squares reduction")
    if config.mode == "exact" and H > 1:
        notes.append("second all-reduce after the MoE")
    return reasons, notes


def build_report(model, family, shape, config, seconds, source, batches) -> ConversionReport:
    layers = []
    for i in range(shape.num_layers):
        reasons, notes = layer_reasons(i, shape, family, config)
        kind = "moe" if i in shape.moe_layers else "dense"
        layers.append(LayerReport(i, kind, exact=not reasons, reasons=reasons, notes=notes))
    G, H, k = config.report_gpus, config.num_groups, shape.top_k
    report = ConversionReport(
        model_type=model.config.model_type, mode=config.mode, num_groups=H, num_experts=shape.num_experts,
        top_k=k, expert_assignment=config.expert_assignment if isinstance(config.expert_assignment, str)
        else "explicit", attn_stream_scale=config.attn_stream_scale, conversion_seconds=seconds, layers=layers,
        communication=CommunicationReport(G, shape.hidden_size, shape.num_layers, ep_volume(k, G),
                                          foe_volume(k, H, G), exact_volume(k, H, G)),
    )
    if source is not None:
        converted, routing = routing_stats(model, batches)
        for lr in layers:
            lr.hidden_rel_error = rel_error(converted.hidden[lr.index], source.hidden[lr.index])
            lr.routing_agreement, lr.prob_mass_kept = routing.get(lr.index, (None, None))
        report.logits_rel_error = rel_error(converted.logits, source.logits)
        report.logits_max_rel_error = max_rel_error(converted.logits, source.logits)
        agree = sum(float((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(converted.logits, source.logits))
        report.calibration_tokens = sum(b.numel() for b in batches)
        report.next_token_agreement = agree / report.calibration_tokens
    return report


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a converted model saved with save_pretrained (source layout + config.foe).

    Refuses, with a ValueError naming the file, a `foe` section with missing or unknown keys,
    another schema version or settings edited after saving (serialization.py), and a
    checkpoint that lacks weights the model needs (transformers would initialise them randomly).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .serialization import foe_config_from_section

    hf_config = AutoConfig.from_pretrained(path)
    foe = getattr(hf_config, "foe", None)
    if foe is None:
        raise ValueError(f"{path} holds no converted model (config.json has no 'foe' section); use convert()")
    config = foe_config_from_section(foe, os.path.join(path, "config.json"))
    del hf_config.foe
    kwargs.pop("output_loading_info", None)
    model, info = AutoModelForCausalLM.from_pretrained(path, config=hf_config, output_loading_info=True, **kwargs)
    lost = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if lost:
        raise ValueError(f"{path}: the checkpoint lacks {len(lost)} weight(s) the model needs (e.g. {lost[0]}); "
                         f"it is incomplete or belongs to another model")
    model, _ = convert(model, config)
    return model
