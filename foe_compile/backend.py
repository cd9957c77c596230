"""torch.compile(model, backend="foe"): capture -> FX passes -> Inductor.

    compiled = torch.compile(model, backend="foe", fullgraph=True)
    compiled = torch.compile(model, backend="foe", options={"num_groups": 2, "compiler": "eager"})

Options: num_groups (H; default: the largest H dividing every KV-head and expert count, and
top-k in the FoE form), compiler ("inductor", default, or "eager": run the rewritten ATen
graph as is, for debugging and fast tests), mode ("exact", default, or "foe") and
attn_stream_scale (c in [1, H], FoE form only). Options are checked before anything is traced
(validate_options): a bad one raises ValueError saying what is valid, which Dynamo reports as
BackendCompilerFailed ("backend='foe' raised: ValueError: ...", the ValueError in
its `inner_exception`); call validate_options yourself to get it before the first call.
FOE_DUMP_GRAPHS=<dir> writes the graph after every pass.
By default the backend never changes what a model computes: it applies exact rewrites only (a
converted model already carries its FoE form and its foe:: ops). mode="foe" asks for the
approximate FoE form explicitly (quota routing, group streams) and logs a warning that says so.
Per-expert loops with data-dependent shapes (v4-style index_add_) need
torch._dynamo.config.capture_dynamic_output_shape_ops = True to be captured in one graph.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import torch
from torch import fx

from .capture import aten_graph_from_dynamo
from .passes import run_passes
from .validation import copy_graph, tensor_leaves, tolerance, validated_exact_rewrite

log = logging.getLogger(__name__)
_OPTIONS = ("num_groups", "compiler", "mode", "attn_stream_scale")
_COMPILERS, _MODES = ("inductor", "eager"), ("exact", "foe")


def validate_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The backend's options with their defaults, or ValueError saying what is valid."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"foe backend options must be a dict with keys from {list(_OPTIONS)}, "
                         f"got {type(options).__name__}")
    unknown = sorted(set(options) - set(_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"unknown foe backend option(s) {unknown}; valid: {list(_OPTIONS)}")
    H = options.get("num_groups")
    if H is not None and (isinstance(H, bool) or not isinstance(H, Integral) or H < 1):
        raise ValueError(f"foe backend option num_groups must be an integer >= 1 (or left out: chosen from the "
                         f"model), got {H!r}")
    compiler = options.get("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise ValueError(f"foe backend option compiler must be 'inductor' or 'eager', got {compiler!r}")
    mode = options.get("mode", "exact")
    if mode not in _MODES:
        raise ValueError(f"foe backend option mode must be 'exact' or 'foe', got {mode!r}")
    c = options.get("attn_stream_scale")
    if c is not None:
        if mode != "foe":
            raise ValueError("foe backend option attn_stream_scale only applies to mode='foe' (the exact form has one "
                             "shared stream); leave it out or set mode='foe'")
        top = "H" if H is None else f"H={H}"
        if isinstance(c, bool) or not isinstance(c, Real) or not math.isfinite(c) or c < 1 or (H and c > H):
            raise ValueError(f"foe backend option attn_stream_scale must be a number in [1, {top}], got {c!r}")
        c = float(c)
    return dict(num_groups=None if H is None else int(H), compiler=compiler, mode=mode, attn_stream_scale=c)


def foe_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **_: Any):
    opts = validate_options(options)
    compiler, mode = opts["compiler"], opts["mode"]
    captured = aten_graph_from_dynamo(gm, example_inputs)
    aten_gm, results = _rewrite(gm, captured, example_inputs, opts)
    if mode == "foe":
        log.warning("foe backend, mode='foe': the compiled model uses quota routing and per-group residual "
                    "streams, so its outputs differ from the source model's (convert() reports by how much)")
    log.info("foe passes: %s", ", ".join(f"{r.name}={r.rewrites}" for r in results))
    aten_gm.meta["foe_pass_results"] = results
    last_results.clear()
    last_results.extend(results)
    if compiler == "eager":
        return aten_gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(aten_gm, example_inputs)


def _rewrite(dynamo_gm: fx.GraphModule, captured: fx.GraphModule, example_inputs: list[Any], opts: dict):
    """The passes on `captured`, with translation validation of the exact rewrites on Dynamo's
    example inputs (the Dynamo graph is the reference): a block whose rewrite changes the outputs
    is left as written. The FoE form is then built from the blocks that validated (and refused,
    with the reason, if one did not)."""
    concrete = [_concrete(x) for x in example_inputs]
    references = [tensor_leaves(dynamo_gm(*concrete))]
    tol = tolerance(references[0])
    exact_groups = opts["num_groups"] if opts["mode"] == "exact" else None
    aten_gm, results, error, left = validated_exact_rewrite(captured, exact_groups, [tuple(concrete)], references, tol)
    log.info("foe backend: exact rewrite validated, max relative error %.2e (tolerance %.0e)", error, tol)
    if opts["mode"] == "foe":
        aten_gm = copy_graph(captured)
        results = run_passes(aten_gm, opts["num_groups"], "foe", opts["attn_stream_scale"], leave=left)
    return aten_gm, results


def _concrete(x: Any) -> Any:
    """A real value for an example input: Dynamo passes SymInts for sizes it made dynamic."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return x


# The pass results of the most recent compilation (for tests, benchmarks and the CLI).
last_results: list = []


def register() -> None:
    """Make backend="foe" available (also declared as a torch_dynamo_backends entry point)."""
    from torch._dynamo import list_backends, register_backend

    if "foe" not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=foe_backend, name="foe")

