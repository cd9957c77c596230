"""Capture: a model, decoder layer or Dynamo graph -> an ATen graph in pre-dispatch IR."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx


def aten_graph_from_dynamo(gm: fx.GraphModule, example_inputs: list[Any]) -> fx.GraphModule:
    """Re-trace a Dynamo graph into pre-dispatch ATen under Dynamo's own fake mode.

    Dynamo hands a backend real tensors (and SymInts once it has made sizes dynamic); their fake
    counterparts from Dynamo's fake mode carry the symbolic sizes, and the Python dispatcher keeps
    them symbolic while tracing, so a recompile for a new length yields one graph for all lengths
    instead of one per length. The Dynamo graph's parameters are real tensors; they become fake
    constants here only for tracing (the returned graph still reads the real ones)."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return make_fx(gm, pre_dispatch=True)(*example_inputs)
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    previous, fake_mode.allow_non_fake_inputs = fake_mode.allow_non_fake_inputs, True
    try:
        with fake_mode, enable_python_dispatcher():
            return make_fx(gm, pre_dispatch=True)(*fakes)
    finally:
        fake_mode.allow_non_fake_inputs = previous


class Positional(nn.Module):
    """`model` called with positional inputs only, and `fixed` keyword arguments baked in.

    What the FX path captures: the captured program then takes exactly the inputs the user gives
    (no `use_cache=False` to repeat on every call), and models whose forward takes `**kwargs`
    (Granite's) capture like any other."""

    def __init__(self, model: nn.Module, fixed: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.fixed = dict(fixed or {})

    def forward(self, *args: Any) -> Any:
        return self.model(*args, **self.fixed)


def export_aten(module: nn.Module, args: tuple, kwargs: dict | None = None,
                dynamic: bool = False) -> torch.export.ExportedProgram:
    """torch.export (non-strict) of a model or decoder layer without KV cache.

    dynamic=True lets every dimension of the positional tensor inputs stay symbolic where the
    model allows it (torch.export.Dim.AUTO), so the result runs at other batch sizes and sequence
    lengths. Where an example dimension is 1, size-oblivious guards keep it symbolic (a [1, T]
    example does not pin the batch to 1); otherwise they are left off, since they turn branches
    such as `batch != 1` in library code into guards that then reject batch 1."""
    kwargs = kwargs or {}
    if callable(getattr(module, "graph_for", None)):  # generic.ConvertedGraph: the graph serving `args`
        module = module.graph_for(*args)
    if not dynamic:
        return torch.export.export(module, args, kwargs=kwargs, strict=False)
    if not isinstance(module, Positional):
        module = Positional(module, kwargs)
    shapes = tuple({i: torch.export.Dim.AUTO for i in range(a.dim())} if isinstance(a, torch.Tensor) else None
                   for a in args)
    has_unit_dim = any(isinstance(a, torch.Tensor) and 1 in a.shape for a in args)
    with fx_config.patch(backed_size_oblivious=has_unit_dim):
        return torch.export.export(module, args, dynamic_shapes=(shapes,), strict=False)  # one spec: *args


def capture_kwargs(model: nn.Module) -> dict:
    """Keyword arguments a capture passes: Hugging Face models run without their KV cache."""
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
