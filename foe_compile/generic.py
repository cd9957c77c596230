"""The FX path of convert() for MoE models that are not a known Hugging Face class.

torch.export (non-strict) captures the model on the calibration inputs, the pass pipeline
applies the exact form (per-group attention partials, fused route/dispatch, foe:: experts)
or the FoE form (plus quota routing and one residual stream per group; see
passes/split_group_streams.py for how it treats shared experts and dense layers), and the
result is a GraphModule with the model's calling convention. Batch and sequence sizes stay
symbolic where the model allows it, so it runs at other shapes than the ones it was captured
with.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch
import torch.fx._pytree as fx_pytree
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import assignment
from .calibration import agreement_sums, max_rel_error, rel_error
from .capture import CaptureRefused, Positional, capture_kwargs, export_aten
from .comm import ep_volume, exact_volume, foe_volume
from .config import FoEConfig
from .families import FAMILIES
from .models.group_streams import attention_scale
from .passes import run_passes
from .passes.find_gqa_attention import find_gqa_attention
from .passes.find_moe_blocks import find_moe_blocks
from .passes.matches import ATTENTION_KEY, MOE_KEY, UNTOUCHED_KEY
from .passes.partition_groups import GROUPS_KEY, group_count
from .report import (CommunicationReport, ConversionReport, LayerReport, group_limit_reason, quota_reason,
                     stream_reason)
from .validation import copy_graph, max_relative_error, sample_inputs, tensor_leaves, tolerance, validated_exact_rewrite

log = logging.getLogger(__name__)


class ConvertedGraph(nn.Module):
    """What the FX path returns: the source's computation, captured by torch.export and rewritten
    by the passes, callable with the capture's positional inputs.

    Library code branches on sizes (a batch of 1, a single token), so one captured graph may hold
    only for some shapes (its guards and size ranges say which). A call whose inputs fail every
    graph's guards captures, rewrites and validates one more graph for them, from the source model
    (its weights are shared, never copied), like a torch.compile recompile; if that rewrite does
    not validate, those shapes run the captured source graph unchanged (logged). `graph_module`
    is the first graph; `graphs` holds all of them."""

    def __init__(self, first: fx.GraphModule, build) -> None:
        super().__init__()
        self.graph_module = first  # registered: its weights are the module's state
        # Later graphs share those weights; kept out of the module tree so state_dict() stays one copy.
        self._more: list[fx.GraphModule] = []
        self._build = build  # (args) -> GraphModule for a new shape class; holds the source model

    @property
    def graphs(self) -> list[fx.GraphModule]:
        return [self.graph_module, *self._more]

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def meta(self) -> dict:
        return self.graph_module.meta

    def forward(self, *args):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.graph_module(*args)  # traced (export, compile): the first graph, shapes stay symbolic
        return self.graph_for(*args)(*args)

    def graph_for(self, *args) -> fx.GraphModule:
        """The graph whose guards and size ranges hold for these (real) inputs, captured now if none does."""
        for gm in self.graphs:
            if _guards_hold(gm, args):
                return gm
        log.info("inputs of shapes %s fail the guards of %d captured graph(s): capturing another",
                 [tuple(a.shape) for a in args if isinstance(a, Tensor)], len(self.graphs))
        gm = self._build(args)
        self._more.append(gm)
        return gm


def _guards_hold(gm: fx.GraphModule, args: tuple) -> bool:
    """torch.export's guard function and the size ranges it recorded (which the unlifted module
    does not check when it has a guard function) both accept `args`."""
    flat = fx_pytree.tree_flatten_spec((list(args), {}), gm._in_spec)
    for value, dims in zip(flat, gm.meta.get(RANGES_KEY, [])):
        if isinstance(value, Tensor) and (value.dim() != len(dims) or any(
                size < lo or (hi is not None and size > hi) for size, (lo, hi) in zip(value.shape, dims))):
            return False
    guards = getattr(gm, "_guards_fn", None)
    if guards is None:
        return True
    try:
        guards(*flat)
    except AssertionError:  # what torch.export's guard function raises on a failed guard
        return False
    return True


RANGES_KEY = "foe_input_ranges"  # per flat input, per dim: (min, max or None) the capture holds for


def _input_ranges(program: torch.export.ExportedProgram) -> list[list[tuple[int, int | None]]]:
    """Per user input of `program`, per dimension, the sizes its graph was captured for."""
    names = set(program.graph_signature.user_inputs)
    ranges = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        value = node.meta.get("val")
        dims = []
        for size in getattr(value, "shape", ()):
            if isinstance(size, int):
                dims.append((size, size))
                continue
            bounds = program.range_constraints.get(size.node.expr)
            dims.append((_finite_int(bounds.lower) or 0, _finite_int(bounds.upper)) if bounds is not None else (0, None))
        ranges.append(dims)
    return ranges


@torch.no_grad()
def convert_generic(model: nn.Module, config: FoEConfig, example: list[Tensor],
                    name: str | None = None) -> tuple[ConvertedGraph, ConversionReport]:
    name = name or type(model).__name__
    if not example:
        raise ValueError(f"converting {name} through the FX path needs calibration_inputs (example inputs to capture)")
    source = Positional(model, capture_kwargs(model))  # the user calls the result with positional inputs only

    def recapture(args: tuple) -> fx.GraphModule:
        """A graph for a new shape class; where it cannot be rewritten exactly (its own translation
        validation fails), the captured source graph unchanged, so the result is still the source's."""
        try:
            gm, report = _convert_at(source, name, config, tuple(args))
            log.info("recaptured graph: %s", report.exactness())
            return gm
        except (ValueError, RuntimeError) as err:
            log.warning("inputs of shapes %s: %s; they run the captured source graph unchanged",
                        [tuple(a.shape) for a in args if isinstance(a, Tensor)], str(err).splitlines()[0])
            try:
                program = export_aten(source, tuple(args), dynamic=True)
            except (ValueError, RuntimeError) as dynamic_err:  # symbolic sizes the model's code cannot take
                log.warning("capturing them with symbolic sizes failed (%s); capturing at exactly these sizes",
                            str(dynamic_err).splitlines()[0][:200])
                program = export_aten(source, tuple(args), dynamic=False)
            gm = program.module()
            gm.meta[RANGES_KEY] = _input_ranges(program)
            return gm

    gm, report = _convert_at(source, name, config, tuple(example))
    return ConvertedGraph(gm, recapture), report


def _convert_at(source: nn.Module, name: str, config: FoEConfig, args: tuple) -> tuple[fx.GraphModule, ConversionReport]:
    """Capture `source` at `args`, rewrite, validate, report."""
    if config.mode != "foe" and config.expert_assignment != "contiguous":
        raise ValueError(f"expert_assignment={config.expert_assignment!r} only changes the FoE form (quota routing); "
                         "in exact mode use the default 'contiguous'")
    start = time.perf_counter()
    try:
        program = export_aten(source, args, dynamic=True)
    except CaptureRefused as err:  # model code that depends on tensor values: the message says where and why
        raise ValueError(f"torch.export cannot capture {name}: {err}") from err.__cause__
    except Exception as err:  # torch.export raises many types; the user needs what and why, not its internals
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"torch.export cannot capture {name} on inputs of shapes "
            f"{[tuple(a.shape) for a in args if isinstance(a, Tensor)]}, so the FX path cannot convert it: "
            f"{type(err).__name__}: {first[:300]}. This usually means the model's Python branches or loops on tensor "
            "values (e.g. iterating over only the experts that were hit); a version of the model written without "
            "data-dependent control flow converts") from err
    captured = program.module()
    captured.meta[RANGES_KEY] = _input_ranges(program)
    samples = sample_inputs(args)
    # The reference is the eager model itself, run on clones (it must not see its inputs mutated).
    references = [tensor_leaves(source(*_clones(s))) for s in samples]
    tol = tolerance(references[0])
    if max_relative_error(source, references[:1], [_clones(samples[0])]) > 0:
        raise ValueError(f"{name} gives different outputs for the same inputs (dropout or other randomness in "
                         "training mode?), so no rewrite can be validated against it; call model.eval() first")
    capture_error = max_relative_error(captured, references, samples)
    if capture_error > tol:
        raise ValueError(f"torch.export's capture of {name} already differs from the eager model (max relative error "
                         f"{capture_error:.2e} > {tol:.0e}) before any rewrite, so the FX path cannot convert it")
    # Translation validation of the exact rewrites (what every form is built from): a block whose
    # rewrite changes the outputs is left as written, with the measured error as its reason.
    exact_groups = config.num_groups if config.mode == "exact" else None
    gm, results, error, left = validated_exact_rewrite(captured, exact_groups, samples, references, tol)
    if config.mode == "foe":
        perms = _expert_permutations(copy_graph(captured), config, args)
        gm = copy_graph(captured)
        results = run_passes(gm, config.num_groups, "foe", config.attn_stream_scale, perms, leave=left)
    else:
        perms = None
    blocks, untouched = gm.meta.get(MOE_KEY, []), gm.meta.get(UNTOUCHED_KEY, [])
    if not blocks and not untouched:
        raise ValueError(f"no MoE block found in {name}: the FX path needs a router (linear -> top-k) followed by "
                         f"experts; Hugging Face families converted directly: {sorted(FAMILIES)}")
    if not blocks:
        why = "; ".join(f"{router}: {reason}" for router, reason in untouched)
        raise ValueError(f"no MoE block of {name} can be rewritten exactly ({why}); nothing was converted")
    seconds = time.perf_counter() - start
    H = gm.meta[GROUPS_KEY]
    k, E, d = blocks[0].top_k, blocks[0].num_experts, int(blocks[0].hidden.meta["val"].shape[-1])
    layers = _layer_reports(gm, blocks, H, config)
    moe_layers = [layer for layer in layers if layer.kind == "moe"]
    for layer, stats in zip(moe_layers, _routing_stats(gm, blocks, args)):
        if stats is not None:
            layer.routing_agreement, layer.prob_mass_kept = stats
    report = ConversionReport(
        model_type=name, mode=config.mode, num_groups=H, num_experts=E, top_k=k,
        expert_assignment=config.expert_assignment if isinstance(config.expert_assignment, str) else "explicit",
        attn_stream_scale=config.attn_stream_scale, conversion_seconds=seconds, layers=layers,
        communication=CommunicationReport(config.report_gpus, d, len(blocks), ep_volume(k, config.report_gpus),
                                          foe_volume(k, H, config.report_gpus), exact_volume(k, H, config.report_gpus)),
        untouched_blocks=[f"{router}: {reason}" for router, reason in untouched],
        validation_tolerance=tol,
    )
    report.validation_error = error if config.mode == "exact" else max_relative_error(gm, references, samples)
    report.calibration_tokens = sum(a.numel() for a in args if isinstance(a, Tensor) and not a.is_floating_point())
    gm.meta["foe_pass_results"] = results
    gm.meta["foe_expert_assignments"] = perms or [list(range(b.num_experts)) for b in blocks]
    reference, converted = _main_output(references[0]), _main_output(tensor_leaves(gm(*args)))
    report.logits_rel_error = rel_error([converted], [reference])
    report.logits_max_rel_error = max_rel_error([converted], [reference])
    return gm, report


def _finite_int(bound) -> int | None:
    """A range bound as an int; None for an infinite one (torch's int_oo or sympy's oo)."""
    try:
        return int(bound) if bound.is_integer and bound.is_finite else None
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _clones(sample: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, Tensor) else a for a in sample)


def _main_output(outputs: list[Tensor]) -> Tensor:
    """The tensor to compare: the first tensor returned (a Hugging Face output's logits)."""
    return outputs[0]


def _layer_reports(gm: fx.GraphModule, blocks: list, H: int, config: FoEConfig) -> list[LayerReport]:
    """One report per layer = per matched attention and each MLP after it (a hybrid model can have
    several MoE blocks between two attentions; without matched attention, one per MoE block):
    whether it is exact and, in the FoE form, why not."""
    attentions = gm.meta.get(ATTENTION_KEY, [])
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    starts = [position[a.group_heads[0] if a.group_heads else a.sdpa] for a in attentions]
    after: dict[int, list] = {}
    for i, b in enumerate(blocks):
        slot = max(0, bisect.bisect(starts, position[b.output]) - 1) if starts else i
        after.setdefault(slot, []).append(b)
    foe = config.mode == "foe" and H > 1
    c = attention_scale(config.attn_stream_scale, H) if foe else None
    layers = []
    for i in range(max(len(attentions), max(after, default=-1) + 1)):
        streams = foe and i < len(attentions) and attentions[i].reads_group_streams
        for block in after.get(i, [None]):
            reasons = [quota_reason(block.top_k, H, block.num_experts)] if foe and block is not None else []
            if reasons and block.routing.get("n_group", 1) > 1:  # fuse_sum_route_dispatch drops it in the FoE form
                reasons.append(group_limit_reason(block.routing["n_group"], block.routing["topk_group"]))
            if streams:
                reasons.append(stream_reason(c))
            notes = [f"{block.kind} experts lowered to foe::experts_swiglu"] if block is not None else []
            if block is not None and block.graph_routing:
                notes.append(f"routing left as written: {block.graph_routing}")
            layers.append(LayerReport(len(layers), "moe" if block is not None else "dense", exact=not reasons,
                                      reasons=reasons, notes=notes))
    return layers


def _routing_stats(gm: fx.GraphModule, blocks: list, args: tuple) -> list[tuple[float, float] | None]:
    """Per MoE block, the converted graph's routing on the capture inputs against the global top-k
    of the same router scores: (agreement, probability mass kept); None where not fused."""
    fused = [b.route for b in blocks if b.route is not None]
    recorded = _node_values(gm, fused + [r.args[4] for r in fused], args)  # outputs, router weights
    values = {route: (out, weight) for route, out, weight in zip(fused, recorded, recorded[len(fused):])}
    stats = []
    for block in blocks:
        if block.route is None:
            stats.append(None)
            continue
        (_, xn, ids, *_), weight = values[block.route]
        probs = F.softmax(F.linear(xn, weight).float(), dim=-1)
        kept, mass, tokens = agreement_sums(probs, ids)
        stats.append((kept / tokens, mass / tokens))
    return stats


def _expert_permutations(gm: fx.GraphModule, config: FoEConfig, args: tuple) -> list[list[int]] | None:
    """One permutation per MoE block (graph order) for a non-contiguous assignment; calibrated
    assignment measures co-selection on the capture inputs with the source's global top-k."""
    chosen = config.expert_assignment
    if chosen == "contiguous":
        return None
    find_moe_blocks(gm)
    find_gqa_attention(gm)
    blocks = gm.meta[MOE_KEY]
    if not isinstance(chosen, str):
        return [assignment.check_permutation(chosen, b.num_experts) for b in blocks]
    H = group_count(gm, config.num_groups, "foe")
    picks = _node_values(gm, [b.ids for b in blocks], args)
    return [assignment.calibrated(assignment.co_selection(p, b.num_experts), H) for p, b in zip(picks, blocks)]


def _node_values(gm: fx.GraphModule, nodes: list[fx.Node], args: tuple) -> list[Tensor]:
    """Run the graph on `args` and return the values of `nodes`."""
    wanted, values = set(nodes), {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    Recorder(gm).run(*fx_pytree.tree_flatten_spec((list(args), {}), gm._in_spec))
    return [values[n] for n in nodes]
