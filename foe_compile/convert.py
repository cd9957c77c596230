"""convert(): a Hugging Face MoE model -> its Federation-of-Experts (or exact) form."""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import assignment
from .build import replace_layers
from .calibration import as_batches, as_example_inputs, max_rel_error, rel_error, routing_stats, trace
from .comm import ep_volume, exact_volume, foe_volume
from .config import FoEConfig
from .families import Family, family_of, is_supported_family
from .generic import convert_generic
from .hf_blocks import convert_blocks, moe_blocks, source_logits
from .kernels.reference import expert_activation
from .models.group_streams import attention_scale
from .report import CommunicationReport, ConversionReport, LayerReport, quota_reason, stream_reason
from .serialization import is_converted, mark_converted
from .shape import ModelShape
from .validation import TOLERANCE


def convert(
    model: nn.Module,
    config: FoEConfig | None = None,
    *,
    calibration_inputs: Tensor | Iterable[Tensor] | None = None,
    inplace: bool = False,
    **overrides: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Convert a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE causal LM, per instance.

    Returns a new model object and leaves `model` as it was; the new model's weights are views
    of the source's (zero-copy; a calibrated expert permutation copies the experts it moves).
    `inplace=True` converts `model` itself (no second module tree; for memory-tight callers).
    Any other Hugging Face MoE causal LM in exact mode keeps its class: its MoE blocks are
    captured, rewritten and validated one by one (hf_blocks.py), so generate(), the KV cache and
    save_pretrained stay the family's own. Any other model (and mode="foe" for those families)
    goes through the FX path (foe_compile/generic.py): captured with torch.export on
    `calibration_inputs`, rewritten by the passes to the requested form, returned as a
    ConvertedGraph (the source is never modified).

    Every conversion is measured against the source (translation validation): on
    `calibration_inputs` when given, else on random token ids, and `report.exact` is true only
    when the form is exact by construction and the measured logit error is within the dtype's
    tolerance (validation.py). On the meta device nothing can be measured: the report then says
    "unverified". "calibrated" assignment needs `calibration_inputs`; with them the report also
    gives routing agreement and hidden-state errors per layer. Keyword overrides update `config`.

    Example:
        >>> from transformers import Qwen3MoeForCausalLM
        >>> from foe_compile import builtin_config, convert
        >>> model = Qwen3MoeForCausalLM(builtin_config("qwen3-moe-tiny"))
        >>> converted, report = convert(model, mode="exact")
        >>> report.exact, converted is model
        (True, False)
    """
    config = (config or FoEConfig()).replace(**overrides)
    if not is_supported_family(model):
        blocks = moe_blocks(model) if config.mode == "exact" and is_hf_causal_lm(model) else []
        if not blocks:
            return convert_generic(model, config, as_example_inputs(calibration_inputs))
        try:
            return convert_hf_blocks(model, config, calibration_inputs, inplace)
        except ValueError as block_error:  # no block alone can be rewritten: try the model as one graph
            try:
                return convert_generic(model, config, as_example_inputs(calibration_inputs) or validation_batches(model))
            except ValueError as fx_error:
                raise ValueError(f"{block_error}; and as one graph (FX path): {fx_error}") from fx_error
    family = family_of(model)
    if is_converted(model):
        raise ValueError(f"{type(model).__name__} is already converted; convert the source model instead")
    check_experts(model, family)
    shape = ModelShape.of(model, family)
    batches = as_batches(calibration_inputs)
    measured_on = batches or validation_batches(model)
    source = trace(model, measured_on) if measured_on else None

    start = time.perf_counter()
    target = model if inplace else shared_copy(model)
    config = resolve(target, shape, config, batches)
    replace_layers(target, family, shape, config)
    mark_converted(target, config)
    seconds = time.perf_counter() - start

    report = build_report(target, family, shape, config, seconds, source, measured_on)
    if batches:
        report.calibration_tokens = sum(b.numel() for b in batches)
    return target, report


def is_hf_causal_lm(model: nn.Module) -> bool:
    return all(hasattr(model, attr) for attr in ("config", "generate", "get_input_embeddings"))


def convert_hf_blocks(model: nn.Module, config: FoEConfig, calibration_inputs, inplace: bool):
    """Exact mode for any other Hugging Face family: its MoE blocks rewritten in place (hf_blocks.py)."""
    if is_converted(model):
        raise ValueError(f"{type(model).__name__} is already converted; convert the source model instead")
    batches = as_batches(calibration_inputs)
    measured_on = batches or validation_batches(model)
    if not measured_on:
        raise ValueError(f"{type(model).__name__} is on the meta device: its MoE blocks are converted by capturing "
                         "them on real hidden states; load real (or random) weights first")
    want = source_logits(model, measured_on)
    target = model if inplace else shared_copy(model)
    report = convert_blocks(target, config, measured_on, want, moe_blocks(target))
    report.calibration_tokens = sum(b.numel() for b in batches)
    return target, report


def check_experts(model: nn.Module, family: Family) -> None:
    """foe::experts_swiglu computes act(gate) * up for act in silu / gelu / gelu_tanh: refuse others."""
    for i, layer in enumerate(model.model.layers):
        act = getattr(getattr(layer.mlp, "experts", None), "act_fn", None)
        if act is not None and expert_activation(act) is None:
            raise ValueError(
                f"{type(model).__name__} layer {i}: the experts' activation is {type(act).__name__} (config hidden_act="
                f"{getattr(model.config, 'hidden_act', None)!r}), but foe::experts_swiglu computes gated units with "
                f"silu, gelu or gelu_tanh; converting would change what the model computes, so this {family.model_type} "
                "model is not converted")


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the source's own tensors (no copy).

    Hooks are shared, not copied: each module's hook dicts become shallow copies (the hook
    objects themselves, e.g. accelerate's offloading hooks with their weights, are never
    duplicated)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        for name, value in vars(module).items():
            if "hook" in name and isinstance(value, dict):
                memo[id(value)] = type(value)(value)
            elif "hook" in name and value is not None:  # e.g. accelerate's module._hf_hook
                memo[id(value)] = value
    return copy.deepcopy(model, memo)


def validation_batches(model: nn.Module, batch: int = 2, length: int = 8, seed: int = 0) -> list[Tensor]:
    """Random token ids to measure a conversion on when no calibration inputs are given (none on
    the meta device, where nothing runs)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta":
        return []
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, weight.shape[0], (batch, length), generator=gen).to(weight.device)]


def resolve(model: nn.Module, shape: ModelShape, config: FoEConfig, batches: list[Tensor]) -> FoEConfig:
    """Fix H and every MoE layer's expert permutation (validating the request)."""
    H = shape.resolve_group_count(config)
    attention_scale(config.attn_stream_scale, H)  # ValueError outside [1, H]
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
        if i > 0:
            reasons.append(stream_reason(attention_scale(config.attn_stream_scale, H)))
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
        tokens = sum(b.numel() for b in batches)
        report.next_token_agreement = agree / tokens
        report.validation_error = report.logits_max_rel_error
        report.validation_tolerance = TOLERANCE.get(model.dtype, TOLERANCE[torch.float32])
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
    model, _ = convert(model, config, inplace=True)  # the loaded model is ours to convert
    return model
