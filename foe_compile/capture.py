"""Capture: a model, decoder layer or Dynamo graph -> an ATen graph in pre-dispatch IR."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx


def aten_graph_from_dynamo(gm: fx.GraphModule, example_inputs: list[Any]) -> fx.GraphModule:
    """Re-trace a Dynamo graph into pre-dispatch ATen under Dynamo's own fake mode.

    The Dynamo graph's parameters are real tensors; they become fake constants here only for
    tracing (the returned graph still reads the real ones)."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return make_fx(gm, pre_dispatch=True)(*example_inputs)
    previous, fake_mode.allow_non_fake_inputs = fake_mode.allow_non_fake_inputs, True
    try:
        with fake_mode:
            return make_fx(gm, pre_dispatch=True)(*example_inputs)
    finally:
        fake_mode.allow_non_fake_inputs = previous


def export_aten(module: nn.Module, args: tuple, kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """torch.export (non-strict) of a model or decoder layer without KV cache."""
    return torch.export.export(module, args, kwargs=kwargs or {}, strict=False)
