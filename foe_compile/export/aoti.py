"""AOTInductor export: a converted model compiled ahead of time into one .pt2 package.

The package calls the foe:: ops through the dispatcher (AOTInductor's proxy executor), so
loading it needs foe_compile imported (schemas and kernels registered); `load_aoti` does that.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..capture import capture_kwargs, export_aten


def to_aoti(model: nn.Module, inputs: tuple[Tensor, ...] | Tensor, path: str | os.PathLike) -> str:
    """Compile `model` ahead of time for the device of `inputs`; batch and sequence stay symbolic."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    program = export_aten(model, args, capture_kwargs(model), dynamic=True)
    return torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path))


def load_aoti(path: str | os.PathLike):
    """The compiled model in a .pt2 package written by to_aoti; call it like the source model."""
    from ..kernels import ops  # noqa: F401  registers torch.ops.foe for the package's calls

    return torch._inductor.aoti_load_package(os.fspath(path))
