"""Capture: a model, decoder layer or Dynamo graph -> an ATen graph in pre-dispatch IR."""
from __future__ import annotations

import linecache
import logging
import os
import sysconfig
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .exportable_experts import exportable_experts

log = logging.getLogger(__name__)


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
    try:
        with exportable_experts(module):
            if not dynamic:
                return torch.export.export(module, args, kwargs=kwargs, strict=False)
            if not isinstance(module, Positional):
                module = Positional(module, kwargs)
            shapes = tuple({i: torch.export.Dim.AUTO for i in range(a.dim())} if isinstance(a, torch.Tensor)
                           else None for a in args)
            has_unit_dim = any(isinstance(a, torch.Tensor) and 1 in a.shape for a in args)
            with fx_config.patch(backed_size_oblivious=has_unit_dim):
                return torch.export.export(module, args, dynamic_shapes=(shapes,), strict=False)  # one spec: *args
    except Exception as err:  # re-raised unchanged unless it is a data-dependent guard
        reason = data_dependent_reason(err)
        if reason is None:
            raise
        raise CaptureRefused(reason) from err


def capture_kwargs(model: nn.Module) -> dict:
    """Keyword arguments a capture passes: Hugging Face models run without their KV cache."""
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


# Why a capture failed ----------------------------------------------------------------------------

class CaptureRefused(ValueError):
    """torch.export cannot capture the model because the model's Python code depends on tensor
    values; the message says where (module, file:line, code), why, and what the user can do."""


_TORCH_DIR = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
_OUR_DIR = os.path.realpath(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIRS = tuple(os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib"))


def _is_model_code(filename: str) -> bool:
    """Not torch's, foe_compile's or the standard library's (installed packages such as transformers are)."""
    if filename.startswith("<"):
        return False
    path = os.path.realpath(filename)
    installed = f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path
    return not (path.startswith((_TORCH_DIR, _OUR_DIR)) or (path.startswith(_STDLIB_DIRS) and not installed))


def _short(filename: str) -> str:
    """transformers/models/... (site-packages prefix dropped), else the path as given."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    return filename


def _data_dependent(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, GuardOnDataDependentSymNode) or "data-dependent" in str(err).split("\n", 1)[0]:
            return True
        err = err.__cause__ or err.__context__
    return False


def data_dependent_reason(err: BaseException) -> str | None:
    """One line naming the model code whose Python control flow depends on tensor values (the
    innermost frame outside torch, the standard library and foe_compile where torch.export hit a
    data-dependent guard), why torch.export cannot capture it, and what the user can do; None when
    `err` is not a data-dependent guard."""
    if not _data_dependent(err):
        return None
    stack = list(traceback.walk_tb(err.__traceback__))
    model = [i for i, (f, _) in enumerate(stack) if _is_model_code(f.f_code.co_filename)]
    if not model:
        return None
    i = model[-1]
    frame, lineno = stack[i]
    frames = [f for f, _ in stack]
    code = linecache.getline(frame.f_code.co_filename, lineno).strip()
    owner = next((type(f.f_locals["self"]).__name__ for f in reversed(frames[:i + 1])
                  if isinstance(f.f_locals.get("self"), nn.Module)), None)
    where = (f"{owner or frame.f_code.co_name} ({_short(frame.f_code.co_filename)}:{lineno} in "
             f"{frame.f_code.co_name}: `{code}`)")
    if code.startswith("for ") or (code.startswith(("[", "(")) and " for " in code):
        what = ("loops over a tensor whose length depends on tensor values (e.g. nonzero(): only the experts that "
                "were hit)")
        remedy = ("use a version of that module that loops over all experts (range(num_experts)) or uses grouped "
                  "GEMMs (transformers' @use_experts_implementation experts: foe_compile captures their "
                  "'grouped_mm' implementation automatically)")
    elif code.startswith(("if ", "elif ", "while ", "assert ")) or " if " in code:
        what = "branches in Python on a value computed from tensor values"
        remedy = ("use a version of that module that computes both sides and selects with torch.where (or uses "
                  "torch.cond)")
    else:
        what = ("uses a value computed from tensor values as a Python int (a slice bound, size or index, via .item(), "
                "int() or a 0-d tensor)")
        remedy = ("use a version of that module that keeps such values tensors (index_select / index_copy_ / grouped "
                  "GEMMs instead of slices with data-dependent bounds)")
    return f"{where} {what}, which torch.export cannot record in a graph; to convert the model, {remedy}"
