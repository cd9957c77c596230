"""Which kernel runs each foe:: op, per device.

The op schemas and the reference live in `ops.py`. This module registers one CPU and one CUDA
implementation per op that forwards to the selected backend:

    reference  the plain-PyTorch reference (debugging; always available)
    native     the compiled extension foe_compile._C (C++ on CPU, CUDA on GPUs)
    cupy       the same .cu sources compiled at run time with NVRTC through CuPy (GPU, no build)
    triton     Triton kernels (GPU; on CPU only through TRITON_INTERPRET=1, in tests)
    auto       the documented, measured rule in `preference()`

Select with FOE_KERNELS=<backend> or `use_backend(...)`. Kernel modules add themselves with
`register(op, backend)`; a backend that is not available falls back under "auto" and raises
a clear error when asked for explicitly.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from . import reference

BACKENDS = ("auto", "reference", "native", "cupy", "triton")
OPS = ("sum_route_dispatch", "experts_swiglu")
_KERNELS: dict[tuple[str, str], Callable] = {
    ("sum_route_dispatch", "reference"): reference.sum_route_dispatch,
    ("experts_swiglu", "reference"): reference.experts_swiglu,
}
_DEVICE_TYPES: dict[tuple[str, str], tuple[str, ...]] = {}
_selected = os.environ.get("FOE_KERNELS", "auto")


def register(op: str, backend: str, device_types: tuple[str, ...] = ("cpu", "cuda")) -> Callable[[Callable], Callable]:
    """Decorator for kernel modules: `fn` implements `op` (same arguments as the schema) on tensors of
    `device_types` (e.g. the native backend covers "cuda" only when the extension was built with CUDA)."""
    if op not in OPS or backend not in BACKENDS[1:]:
        raise ValueError(f"unknown op/backend {op!r}/{backend!r}; ops {OPS}, backends {BACKENDS[1:]}")

    def wrap(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = fn
        _DEVICE_TYPES[(op, backend)] = device_types
        return fn

    return wrap


def available(op: str, backend: str, device_type: str | None = None) -> bool:
    """Whether `backend` implements `op` (on `device_type`, when given)."""
    if (op, backend) not in _KERNELS:
        return False
    return device_type is None or backend == "reference" or device_type in _DEVICE_TYPES[(op, backend)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    global _selected
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    previous, _selected = _selected, name
    try:
        yield
    finally:
        _selected = previous


def preference(op: str, device_type: str, tokens: int | None = None, num_experts: int | None = None,
               capturing: bool = False) -> tuple[str, ...]:
    """The "auto" rule, most preferred first (the reference is the last resort).

    CPU: native C++. CUDA route/dispatch: native CUDA, then CuPy (same sources, compiled at run
    time), then Triton. CUDA experts: Triton (grouped GEMM on tensor cores), except eager decode
    (one token, E >= 64, not inside a CUDA-graph capture), where the three Triton launches cost
    more than the native warp-per-row kernels.
    NOTE (H100, bf16, bench/measured/h100_0af9f82_bench.csv): experts at T=1 eager, native vs
    Triton: Qwen3 0.063 vs 0.108 ms, OLMoE 0.074 vs 0.111 ms; in a CUDA graph Triton wins (0.040,
    0.048 vs 0.072 ms), and from T=8 or for Mixtral (E=8) Triton wins everywhere.
    """
    if device_type == "cpu":
        return ("native",)
    if op == "experts_swiglu":
        eager_decode = tokens == 1 and (num_experts or 0) >= 64 and not capturing
        return ("native", "cupy", "triton") if eager_decode else ("triton", "native", "cupy")
    return ("native", "cupy", "triton")


def choose(op: str, device: torch.device, tokens: int | None = None, num_experts: int | None = None) -> str:
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    order = preference(op, device.type, tokens, num_experts, capturing)
    return next((b for b in order if available(op, b, device.type)), "reference")


def kernel(op: str, device: torch.device, tokens: int | None = None, num_experts: int | None = None) -> Callable:
    backend = _selected if _selected != "auto" else choose(op, device, tokens, num_experts)
    if backend not in BACKENDS:
        raise ValueError(f"FOE_KERNELS={backend!r} is not a kernel backend; choose one of {BACKENDS}")
    if not available(op, backend, device.type):
        raise RuntimeError(
            f"kernel backend {backend!r} has no implementation of foe::{op} on {device.type} here "
            f"(build the extension with `pip install -e .`, or use FOE_KERNELS=auto/reference)"
        )
    return _KERNELS[(op, backend)]


for _device in ("CPU", "CUDA"):
    torch.library.impl("foe::sum_route_dispatch", _device)(
        lambda *args: kernel("sum_route_dispatch", args[1].device)(*args))
    torch.library.impl("foe::experts_swiglu", _device)(  # x [T, d], gate_up [E, 2I, d]
        lambda *args: kernel("experts_swiglu", args[0].device, args[0].shape[0], args[1].shape[0])(*args))
