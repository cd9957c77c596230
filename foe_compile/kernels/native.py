"""The compiled backend "native": foe_compile._C (C++ on CPU, CUDA on GPUs; sources in csrc/).

Importing foe_compile._C registers foe::sum_route_dispatch_native and foe::experts_swiglu_native
(the public ops' schemas, see ops.py). This module adds their fake impls and registers them with
`dispatch` as backend "native" (foe::experts_swiglu with every expert-unit variant, foe::sum_route_dispatch
with every router variant). When the extension
is not built the package still imports: `UNAVAILABLE_REASON` says why and how to build it, and "auto"
falls back to other backends.
"""
from __future__ import annotations

import torch

from . import dispatch, ops  # noqa: F401  ops defines the public ops whose fakes are reused

try:
    from foe_compile import _C
except ImportError as error:  # not built (pure-Python install) or built against another torch
    _C = None
    UNAVAILABLE_REASON: str | None = (
        f"foe_compile._C is not built ({error}): run `pip install -e . --no-build-isolation` "
        "(needs a C++ compiler; nvcc and a CUDA torch add the CUDA kernels)")
else:
    UNAVAILABLE_REASON = None


def build_info() -> dict:
    """The extension's build information (torch version, CUDA, archs, compiler, git commit)."""
    if _C is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    return _C.build_info()


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _C is not None and bool(_C.build_info()["cuda"])


def _fake_route(*args):  # the public op's fake impl (same schema), run on the fake inputs
    return torch.ops.foe.sum_route_dispatch.default(*args)


def _fake_experts(*args):
    return torch.ops.foe.experts_swiglu.default(*args)


if _C is not None:
    torch.library.register_fake("foe::sum_route_dispatch_native")(_fake_route)
    torch.library.register_fake("foe::experts_swiglu_native")(_fake_experts)
    _devices = ("cpu", "cuda") if has_cuda() else ("cpu",)
    dispatch.register("sum_route_dispatch", "native", _devices, features=dispatch.FEATURES["sum_route_dispatch"])(
        lambda *args: torch.ops.foe.sum_route_dispatch_native(*args))
    dispatch.register("experts_swiglu", "native", _devices, features=dispatch.FEATURES["experts_swiglu"])(
        lambda *args: torch.ops.foe.experts_swiglu_native(*args))
