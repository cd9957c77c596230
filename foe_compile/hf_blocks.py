"""Module-level exact conversion of every Hugging Face MoE family, one MoE block at a time.

The families with FoE layer classes (families.py) convert at module level in both modes. Any
other Hugging Face causal LM converts in exact mode by keeping its model object and rewriting
only its MoE blocks: every block module (found by structure, not by family: a module with an
`experts` submodule that is not a decoder layer) is captured alone with torch.export on the
hidden states it receives from the calibration inputs, rewritten by the FX passes (routing fused
where foe::sum_route_dispatch computes it exactly, else left as written; experts lowered to
foe::experts_swiglu with the unit the matcher recognised) and validated against the block
itself; the block then serves its forward from that graph. Attention, the KV cache, masks,
generate(), hidden-state outputs and save_pretrained stay the family's own, so no per-family
table of projections and norms is needed. A block that cannot be rewritten stays as written
(its reason is in the report). Where the router logits are asked for (output_router_logits),
a call runs the source blocks, whose routers transformers records. The FoE form cannot be
built one block at a time (it changes the residual stream between attention and MoE), so
mode="foe" for these families goes through the whole-model FX path (generic.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time

import torch
from torch import Tensor, nn

from .calibration import max_rel_error, rel_error
from .comm import ep_volume, exact_volume, foe_volume
from . import serialization
from .config import FoEConfig
from .generic import ConvertedGraph, convert_generic
from .report import CommunicationReport, ConversionReport, LayerReport
from .validation import TOLERANCE

log = logging.getLogger(__name__)

_DECODER_LAYER_ATTRS = ("self_attn", "self_attention", "attention", "input_layernorm")
_source_blocks_only = contextvars.ContextVar("foe_source_blocks_only", default=False)


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE block: the outermost modules holding an `experts` submodule that
    are not decoder layers (Gemma 4 computes its MoE inline in the decoder layer: none found)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if isinstance(getattr(module, "experts", None), nn.Module) and \
                not any(hasattr(module, attr) for attr in _DECODER_LAYER_ATTRS):
            found.append((name, module))
    return found


class SourceBlock(nn.Module):
    """What is captured for a block (also when a new shape class is captured after conversion): the
    block's source forward, taking its positional tensors then its tensor keyword arguments (in
    `tensor_keys` order) by position, with its other keyword arguments baked in."""

    def __init__(self, block: nn.Module, source_cls: type, num_args: int, tensor_keys: list[str], fixed: dict) -> None:
        super().__init__()
        self.block, self.source_cls, self.fixed = block, source_cls, fixed
        self.num_args, self.tensor_keys = num_args, tensor_keys

    def forward(self, *inputs):
        keyed = dict(zip(self.tensor_keys, inputs[self.num_args:]))
        return self.source_cls.forward(self.block, *inputs[:self.num_args], **keyed, **self.fixed)


class BlockGraph:
    """What a converted block serves its calls from: the rewritten graph, for calls made the way the
    calibration call was (the same number of positional tensors, tensors for the same keywords, the
    same other keyword arguments)."""

    def __init__(self, graph: ConvertedGraph, block: nn.Module, example: Tensor, num_args: int,
                 tensor_keys: list[str], fixed: dict) -> None:
        self.graph, self.num_args, self.tensor_keys, self.fixed = graph, num_args, tensor_keys, fixed
        # The graph bakes in the dtypes and device it was captured with: after model.to(...) the block
        # runs its source forward (logged once) until it is converted again.
        self.weight = next(block.parameters())
        self.captured = (example.dtype, example.device, self.weight.dtype, self.weight.device)
        self.warned = False

    def __deepcopy__(self, memo):
        raise TypeError("a model whose MoE blocks were converted cannot be deep-copied (its graphs hold the weights); "
                        "deep-copy the source model and convert the copy")

    def __reduce__(self):
        raise TypeError("a model whose MoE blocks were converted cannot be pickled; save it with save_pretrained() "
                        "and load it with foe_compile.from_pretrained()")

    def inputs(self, args: tuple, kwargs: dict) -> tuple | None:
        """The graph's inputs for this call, or None when the graph does not serve it."""
        if _source_blocks_only.get() or len(args) != self.num_args or not all(isinstance(a, Tensor) for a in args):
            return None
        if (args[0].dtype, args[0].device, self.weight.dtype, self.weight.device) != self.captured:
            if not self.warned:
                self.warned = True
                log.warning("a converted MoE block was moved to another dtype or device than it was captured on; "
                            "it runs its source forward (convert the moved source model again to rewrite it)")
            return None
        if kwargs.keys() != {*self.tensor_keys, *self.fixed}:
            return None
        if not all(isinstance(kwargs[k], Tensor) for k in self.tensor_keys):
            return None
        if not all(kwargs[k] is v or (not isinstance(v, (Tensor, tuple, list)) and kwargs[k] == v)
                   for k, v in self.fixed.items()):
            return None
        return (*args, *(kwargs[k] for k in self.tensor_keys))


_BLOCK_CLASSES: dict[type, type] = {}


def converted_block_class(cls: type) -> type:
    """`cls` whose forward runs its BlockGraph when it serves the call, else the source forward."""
    if cls not in _BLOCK_CLASSES:
        def forward(self, *args, **kwargs):
            served: BlockGraph | None = self.__dict__.get("_foe_block_graph")
            inputs = served.inputs(args, kwargs) if served is not None else None
            if inputs is not None:
                return served.graph(*inputs)
            return cls.forward(self, *args, **kwargs)

        _BLOCK_CLASSES[cls] = type(f"Converted{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _BLOCK_CLASSES[cls]


@contextlib.contextmanager
def source_blocks() -> contextlib.AbstractContextManager[None]:
    """Within this context converted blocks run their source forward (router logits are recorded)."""
    token = _source_blocks_only.set(True)
    try:
        yield
    finally:
        _source_blocks_only.reset(token)


@torch.no_grad()
def source_logits(model: nn.Module, batches: list[Tensor]) -> list[Tensor]:
    """The source model's logits on `batches` (measured before converting, as `model` may be converted in place)."""
    return [model(ids, use_cache=False).logits.float() for ids in batches]


@torch.no_grad()
def convert_blocks(target: nn.Module, config: FoEConfig, batches: list[Tensor], want: list[Tensor],
                   blocks: list[tuple[str, nn.Module]]) -> ConversionReport:
    """Convert `target`'s MoE `blocks` in place (exact form) with `batches[0]` as the calibration
    input, measure `target` against the source's logits `want` on `batches`, and report."""
    start = time.perf_counter()
    inputs = _block_inputs(target, blocks, batches[0])
    layers, untouched, block_reports = [], [], []
    for index, (name, block) in enumerate(blocks):
        if name not in inputs:
            untouched.append(f"{name}: never called on the calibration inputs")
            continue
        args, kwargs = inputs[name]
        if not args or not all(isinstance(a, Tensor) for a in args):
            untouched.append(f"{name}: called with non-tensor positional inputs")
            continue
        if "forward" in block.__dict__:  # e.g. accelerate's hooks replace the instance's forward
            untouched.append(f"{name}: its forward is replaced on the instance (hooks), which a converted class "
                             "would bypass")
            continue
        tensor_keys = sorted(k for k, v in kwargs.items() if isinstance(v, Tensor))
        fixed = {k: v for k, v in kwargs.items() if k not in tensor_keys}
        captured = SourceBlock(block, type(block), len(args), tensor_keys, fixed)
        try:
            graph, report = convert_generic(captured, config.replace(num_groups=1),
                                            [*args, *(kwargs[k] for k in tensor_keys)], name=type(block).__name__)
        except ValueError as err:
            untouched.append(f"{name}: {str(err).splitlines()[0]}")
            continue
        block.__class__ = converted_block_class(type(block))
        # Not a submodule, so state_dict() is unchanged.
        block.__dict__["_foe_block_graph"] = BlockGraph(graph, block, args[0], len(args), tensor_keys, fixed)
        block_reports.append(report)
        untouched += [f"{name}: {why}" for why in report.untouched_blocks]
        layers += [LayerReport(_layer_index(name, index), "moe", exact=layer.exact, reasons=layer.reasons,
                               notes=[f"{name}: {note}" for note in layer.notes]) for layer in report.layers]
    if not block_reports:
        raise ValueError(f"no MoE block of {type(target).__name__} can be rewritten exactly: " + _grouped(untouched))
    first = block_reports[0]
    G, d = config.report_gpus, _hidden_size(target)
    report = ConversionReport(
        model_type=type(target).__name__, mode="exact", num_groups=1, num_experts=first.num_experts,
        top_k=first.top_k, expert_assignment="contiguous", attn_stream_scale=None,
        conversion_seconds=time.perf_counter() - start, layers=layers,
        communication=CommunicationReport(G, d, len(layers), ep_volume(first.top_k, G), foe_volume(first.top_k, 1, G),
                                          exact_volume(first.top_k, 1, G)),
        untouched_blocks=untouched)
    mark_blocks_converted(target, config)
    _measure(report, target, batches, want)
    return report


def _layer_index(name: str, position: int) -> int:
    """The decoder layer number in a block's name (model.layers.7.mlp -> 7), else its position."""
    return next((int(part) for part in name.split(".") if part.isdigit()), position)


def _grouped(reasons: list[str]) -> str:
    """"name: why" lines with the same why given once, after all their names."""
    names: dict[str, list[str]] = {}
    for line in reasons:
        name, _, why = line.partition(": ")
        names.setdefault(why, []).append(name)
    return "; ".join(f"{', '.join(n)}: {why}" for why, n in names.items())


def _hidden_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


def _block_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], ids: Tensor) -> dict[str, tuple]:
    """Each block's (args, kwargs) on its first call while `model` runs on `ids` (no KV cache); tensors
    are cloned (the captures must not see later in-place updates)."""
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(_module, args, kwargs):
            clone = lambda v: v.detach().clone() if isinstance(v, Tensor) else v  # noqa: E731
            seen.setdefault(name, (tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
        return hook

    handles = [module.register_forward_pre_hook(record(name), with_kwargs=True) for name, module in blocks]
    try:
        model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _measure(report: ConversionReport, target: nn.Module, batches: list[Tensor], want: list[Tensor]) -> None:
    """Logit errors and next-token agreement of `target` against the source's logits (the translation
    validation of the whole model: report.exact needs every block rewritten exactly AND this within
    tolerance)."""
    got = [target(ids, use_cache=False).logits.float() for ids in batches]
    report.logits_rel_error = rel_error(got, want)
    report.logits_max_rel_error = max_rel_error(got, want)
    tokens = sum(w.shape[0] * w.shape[1] for w in want)
    report.next_token_agreement = sum(float((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want)) / tokens
    report.validation_error = report.logits_max_rel_error
    report.validation_tolerance = TOLERANCE.get(next(target.parameters()).dtype, TOLERANCE[torch.float32])


def mark_blocks_converted(model: nn.Module, config: FoEConfig) -> None:
    """Give this instance a subclass whose forward runs the source blocks when router logits are asked
    for, and whose save_pretrained writes the source layout (its state_dict, unchanged) plus config.foe."""
    cls = type(model)
    if cls not in serialization.BLOCK_CONVERTED_CLASSES:
        def forward(self, *args, **kwargs):
            flag = kwargs.get("output_router_logits")
            wants_router = flag if flag is not None else getattr(self.config, "output_router_logits", False)
            with source_blocks() if wants_router else contextlib.nullcontext():
                return cls.forward(self, *args, **kwargs)

        serialization.BLOCK_CONVERTED_CLASSES[cls] = type(
            f"FoE{cls.__name__}", (cls,), {"forward": functools.wraps(cls.forward)(forward), "__module__": __name__,
                                           "save_pretrained": serialization.save_source_layout,
                                           "from_pretrained": classmethod(serialization.load_converted)})
    model.__class__ = serialization.BLOCK_CONVERTED_CLASSES[cls]
    model.foe_config = config
    model.config.foe = serialization.foe_section(config)
