"""Which kernel runs each foe:: op, per device.

The op schemas and the reference live in `ops.py`. This module registers one CPU and one CUDA
implementation per op that forwards to the selected backend:

    reference  the plain-PyTorch reference (debugging; always available)
    native     the compiled extension foe_compile._C (C++ on CPU, CUDA on GPUs)
    cupy       the same .cu sources compiled at run time with NVRTC through CuPy (GPU, no build)
    triton     Triton kernels (GPU; on CPU only through TRITON_INTERPRET=1, in tests)
    auto       the documented, measured rule in `preference()`

Select with FOE_KERNELS=<backend> or `use_backend(...)`. Kernel modules add themselves with
`register(op, backend, device_types, features)`; a backend that is not available falls back under
"auto" and raises a clear error when asked for explicitly.

Variants. A call of foe::experts_swiglu needs the features of its expert unit (`experts_features`:
the activation, "bias" for expert biases, "clamped" for gpt-oss's alpha / limit / up_offset,
"weight_input" for a routing weight that scales the expert's input, as Llama 4's). A
backend that lacks one is skipped; when it was selected explicitly, a warning names the backend and
the missing feature once, and the call runs on the most preferred backend that has it (the
reference has every feature). Every backend receives all the op's schema arguments.

Likewise foe::sum_route_dispatch (`route_features`): "sigmoid" / "sqrtsoftplus" scores, "router_bias",
"correction_bias", "scaling" (routed_scaling != 1), "group_limit" (n_group > 1), "expert_scale",
"renorm_eps" (renorm_eps or renorm_min != 0), "topk_first". A default call (softmax, no biases, no scaling) passes
only the schema's first 8 arguments, so a backend registered without route features keeps working on it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import torch

from . import ops, reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "native", "cupy", "triton")
OPS = ("sum_route_dispatch", "experts_swiglu")
# Every feature of each op; a backend registers the ones it computes (default: the plain SiLU SwiGLU).
ROUTE_FEATURES = frozenset({"sigmoid", "sqrtsoftplus", "router_bias", "correction_bias", "scaling", "group_limit",
                            "expert_scale", "renorm_eps", "topk_first"})
FEATURES = {"sum_route_dispatch": ROUTE_FEATURES,
            "experts_swiglu": frozenset(reference.ACTIVATIONS) | {"bias", "clamped", "weight_input"}}
BASE_FEATURES = {"sum_route_dispatch": frozenset(), "experts_swiglu": frozenset({"silu"})}
_KERNELS: dict[tuple[str, str], Callable] = {
    ("sum_route_dispatch", "reference"): reference.sum_route_dispatch,
    ("experts_swiglu", "reference"): reference.experts_swiglu,
}
_DEVICE_TYPES: dict[tuple[str, str], tuple[str, ...]] = {}
_FEATURES: dict[tuple[str, str], frozenset[str]] = {(op, "reference"): FEATURES[op] for op in OPS}
_warned: set[tuple[str, str, frozenset[str]]] = set()
_selected = os.environ.get("FOE_KERNELS", "auto")


def register(op: str, backend: str, device_types: tuple[str, ...] = ("cpu", "cuda"),
             features: frozenset[str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator for kernel modules: `fn` implements `op` (called with all the schema's arguments) on
    tensors of `device_types` (e.g. the native backend covers "cuda" only when the extension was built
    with CUDA), for the variants in `features` (default BASE_FEATURES[op])."""
    if op not in OPS or backend not in BACKENDS[1:]:
        raise ValueError(f"unknown op/backend {op!r}/{backend!r}; ops {OPS}, backends {BACKENDS[1:]}")
    features = BASE_FEATURES[op] if features is None else frozenset(features)
    if not features <= FEATURES[op]:
        raise ValueError(f"unknown features {sorted(features - FEATURES[op])} of foe::{op}; known {sorted(FEATURES[op])}")

    def wrap(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = fn
        _DEVICE_TYPES[(op, backend)] = device_types
        _FEATURES[(op, backend)] = features
        return fn

    return wrap


def experts_features(activation: str = "silu", gate_up_bias=None, down_bias=None, alpha: float = 1.0,
                     limit: float | None = None, up_offset: float = 0.0, weight_input: bool = False) -> frozenset[str]:
    """The features a foe::experts_swiglu call needs, from its arguments after num_groups."""
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}; foe::experts_swiglu computes {reference.ACTIVATIONS}")
    needs = {activation}
    if gate_up_bias is not None or down_bias is not None:
        needs.add("bias")
    if alpha != 1.0 or limit is not None or up_offset != 0.0:
        needs.add("clamped")
    if weight_input:
        needs.add("weight_input")
    return frozenset(needs)


def route_features(scoring: str = "softmax", router_bias=None, correction_bias=None, routed_scaling: float = 1.0,
                   n_group: int = 1, topk_group: int = 1, group_fill_zero: bool = False, expert_scale=None,
                   renorm_eps: float = 0.0, renorm_min: float = 0.0, topk_first: bool = False) -> frozenset[str]:
    """The features a foe::sum_route_dispatch call needs, from its router-variant arguments."""
    if scoring not in reference.SCORINGS:
        raise ValueError(f"unknown router scoring {scoring!r}; foe::sum_route_dispatch computes {reference.SCORINGS}")
    needs = set() if scoring == "softmax" else {scoring}
    if router_bias is not None:
        needs.add("router_bias")
    if correction_bias is not None:
        needs.add("correction_bias")
    if routed_scaling != 1.0:
        needs.add("scaling")
    if n_group != 1:
        needs.add("group_limit")
    if expert_scale is not None:
        needs.add("expert_scale")
    if renorm_eps != 0.0 or renorm_min != 0.0:
        needs.add("renorm_eps")
    if topk_first:
        needs.add("topk_first")
    return frozenset(needs)


def available(op: str, backend: str, device_type: str | None = None, needs: frozenset[str] = frozenset()) -> bool:
    """Whether `backend` implements `op` (on `device_type`, when given; with the features `needs`)."""
    if (op, backend) not in _KERNELS or not needs <= _FEATURES[(op, backend)]:
        return False
    return device_type is None or backend == "reference" or device_type in _DEVICE_TYPES[(op, backend)]


def features(op: str, backend: str) -> frozenset[str]:
    """The variants of `op` that `backend` computes (empty when it is not registered)."""
    return _FEATURES.get((op, backend), frozenset())


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


def choose(op: str, device: torch.device, tokens: int | None = None, num_experts: int | None = None,
           needs: frozenset[str] = frozenset()) -> str:
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    order = preference(op, device.type, tokens, num_experts, capturing)
    return next((b for b in order if available(op, b, device.type, needs)), "reference")


def kernel(op: str, device: torch.device, tokens: int | None = None, num_experts: int | None = None,
           needs: frozenset[str] = frozenset()) -> Callable:
    if _selected == "auto":
        return _KERNELS[(op, choose(op, device, tokens, num_experts, needs))]
    backend = _selected
    if backend not in BACKENDS:
        raise ValueError(f"FOE_KERNELS={backend!r} is not a kernel backend; choose one of {BACKENDS}")
    if not available(op, backend, device.type):
        raise RuntimeError(
            f"kernel backend {backend!r} has no implementation of foe::{op} on {device.type} here "
            f"(build the extension with `pip install -e .`, or use FOE_KERNELS=auto/reference)"
        )
    missing = needs - features(op, backend)
    if missing:
        fallback = choose(op, device, tokens, num_experts, needs)
        if (op, backend, missing) not in _warned:
            _warned.add((op, backend, missing))
            log.warning("kernel backend %r does not implement foe::%s with %s; running those calls on %r",
                        backend, op, ", ".join(sorted(missing)), fallback)
        backend = fallback
    return _KERNELS[(op, backend)]


def _route(residual, partials, norm_weight, eps, router_weight, num_groups, top_k, renormalize, *variant):
    needs = route_features(*variant)
    if variant:  # every backend sees checked variant arguments (ValueError saying what to change)
        ops.check_route_variant(router_weight, *variant)
    fn = kernel("sum_route_dispatch", partials.device, needs=needs)
    args = (residual, partials, norm_weight, eps, router_weight, num_groups, top_k, renormalize)
    return fn(*args, *variant) if needs else fn(*args)  # the default call: the schema's first 8 arguments


def _experts(x, gate_up, down, ids, weights, pairs, offsets, num_groups, *unit):
    needs = experts_features(*unit)
    return kernel("experts_swiglu", x.device, x.shape[0], gate_up.shape[0], needs)(
        x, gate_up, down, ids, weights, pairs, offsets, num_groups, *unit)


for _device in ("CPU", "CUDA"):
    torch.library.impl("foe::sum_route_dispatch", _device)(_route)
    torch.library.impl("foe::experts_swiglu", _device)(_experts)
