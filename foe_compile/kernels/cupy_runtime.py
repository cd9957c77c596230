"""Backend "cupy": the CUDA kernels of csrc/kernels/*.cuh compiled at run time (NVRTC via CuPy).

For GPU machines where foe_compile._C was built without CUDA (or not at all): the same kernel text that
nvcc builds into the extension is compiled with `cupy.RawModule` on first use and launched on torch
tensors (raw data pointers) on torch's current stream, so it composes with torch streams and CUDA-graph
capture (compile before capturing: run once eagerly). The .cuh sources are read from the repository
checkout (editable install). Needs: cupy, a CUDA device.

Checked before launching (host side, no device sync): shapes, dtypes (int64 routing tensors), devices and
the sizes the kernels index with int. Not checked: the values of topk_ids / sorted_pairs / expert_offsets
handed to experts_swiglu (see _check_routing_tensors). NaN inputs to sum_route_dispatch are legal: the
same .cuh rule as the native CUDA kernels (NaN ranks first, ids always in [0, E), NaN weights).
"""
from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import dispatch, ops, reference

KERNEL_DIR = Path(__file__).resolve().parents[2] / "csrc" / "kernels"
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

if importlib.util.find_spec("cupy") is None:
    UNAVAILABLE_REASON: str | None = "cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
elif not (KERNEL_DIR / "route_dispatch.cuh").is_file():
    UNAVAILABLE_REASON = f"kernel sources not found in {KERNEL_DIR}: use an editable install of the repository"
else:
    UNAVAILABLE_REASON = None


@cache
def _constants() -> dict[str, int]:
    """Launch constants #defined in the .cuh files (one source of truth for both compilers)."""
    text = "".join(p.read_text() for p in sorted(KERNEL_DIR.glob("*.cuh")))
    return {m[1]: int(m[2]) for m in re.finditer(r"#define (FOE_\w+) (\d+)\b", text)}


@cache
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code='#include "route_dispatch.cuh"\n#include "experts_swiglu.cuh"\n',
                              options=("--std=c++17", f"--include-path={KERNEL_DIR}"))


def _launch(name: str, device: torch.device, grid: tuple[int, ...], block: int, args: list, shared: int = 0) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _module(index).get_function(name)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        kernel(grid, (block,), args, shared_mem=shared)


def _ptr(t: Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _check_dtype(*tensors: Tensor) -> str:
    dtype = tensors[0].dtype
    if dtype not in SUFFIX or any(t.dtype != dtype for t in tensors):
        raise TypeError(f"cupy kernels need one dtype of {list(SUFFIX)} for {[t.dtype for t in tensors]}: cast first")
    if not all(t.is_cuda for t in tensors):
        raise ValueError("the cupy backend runs on CUDA tensors only; use FOE_KERNELS=auto on CPU")
    return SUFFIX[dtype]


def _check_routing_tensors(ids: Tensor, weights: Tensor, pairs: Tensor, offsets: Tensor, device: torch.device) -> None:
    """What the experts kernels need of the routing tensors and can be checked without a device sync.

    The kernels read ids and pairs as int64 (`long long*`): another dtype would be read past its end. Their
    values (ids in [0, E), pairs a permutation of [0, T*k), offsets) are NOT checked on CUDA: that needs a
    device-to-host copy, which CUDA-graph capture forbids. Pass foe::sum_route_dispatch's outputs; the C++
    CPU kernel checks the values (check_routing_indices in csrc/checks.cpp)."""
    if any(t.dtype != torch.int64 for t in (ids, pairs, offsets)):
        raise TypeError(f"topk_ids, sorted_pairs and expert_offsets must be int64 (as foe::sum_route_dispatch returns "
                        f"them), got {ids.dtype}, {pairs.dtype}, {offsets.dtype}")
    if weights.shape != ids.shape or ids.dim() != 2:
        raise ValueError(f"topk_ids and topk_weights must both be [T, k], got {tuple(ids.shape)}, {tuple(weights.shape)}")
    if any(t.device != device for t in (ids, weights, pairs, offsets)):
        raise ValueError(f"all inputs of foe::experts_swiglu must be on x's device {device}")
    if ids.numel() >= 2**31:
        raise ValueError("the CUDA experts kernels take T*k < 2^31: split the batch")


def _group_by_expert(ids: Tensor, num_experts: int, pairs: Tensor, offsets: Tensor) -> None:
    """Stable grouping on the device, the launch plan of group_by_expert_cuda (route_dispatch_cuda.cu)."""
    c = _constants()
    n, E = ids.numel(), np.int32(num_experts)
    if n <= c["FOE_GROUP_SMALL"] and (n + num_experts) * 4 <= 48 * 1024:  # one block; n = 0 too
        _launch("foe_group_small", ids.device, (1,), c["FOE_GROUP_THREADS"],
                [_ptr(ids), np.int32(n), E, _ptr(pairs), _ptr(offsets)], 4 * (n + num_experts))
        return
    tiles = (n + c["FOE_TILE"] - 1) // c["FOE_TILE"]
    if tiles * num_experts >= 2**31:
        raise ValueError("the CUDA grouping needs E * T*k / FOE_TILE < 2^31: split the batch")
    tile_counts = torch.empty(num_experts, tiles, dtype=torch.int32, device=ids.device)  # [E, tiles]
    _launch("foe_count_tiles", ids.device, (tiles,), c["FOE_TILE"],
            [_ptr(ids), np.int32(n), E, np.int32(tiles), _ptr(tile_counts)], 4 * num_experts)
    _launch("foe_scan_flat", ids.device, (1,), c["FOE_SCAN_THREADS"],
            [_ptr(tile_counts), np.int32(tiles), E, _ptr(offsets)])
    _launch("foe_place_tiles", ids.device, (tiles,), c["FOE_TILE"],
            [_ptr(ids), np.int32(n), E, np.int32(tiles), _ptr(tile_counts), _ptr(pairs)])


SCORING_CODE = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}  # FOE_SCORE_* of route_dispatch.cuh


def sum_route_dispatch(residual: Tensor, partials: Tensor, norm_weight: Tensor, eps: float, router_weight: Tensor,
                       num_groups: int, top_k: int, renormalize: bool, scoring: str = "softmax",
                       router_bias: Tensor | None = None, correction_bias: Tensor | None = None,
                       routed_scaling: float = 1.0, n_group: int = 1, topk_group: int = 1, group_fill_zero: bool = False,
                       expert_scale: Tensor | None = None, renorm_eps: float = 0.0, renorm_min: float = 0.0,
                       topk_first: bool = False):
    """Norm kernel, logits = F.linear(xn, router_weight, router_bias) (the reference's call), scores/top-k kernel
    (every router variant; the correction bias and expert scale read in fp32), grouping."""
    ops.check_route_args(residual, partials, norm_weight, router_weight, num_groups, top_k, scoring, router_bias,
                         correction_bias, routed_scaling, n_group, topk_group, group_fill_zero, expert_scale,
                         renorm_eps, renorm_min, topk_first)
    if n_group > _constants()["FOE_MAX_GROUPS"]:
        raise ValueError(f"the CUDA route kernel keeps a group limit's groups in a 64-bit mask: n_group <= 64, "
                         f"got {n_group}")
    suffix = _check_dtype(partials, residual, norm_weight, router_weight,
                          *([] if router_bias is None else [router_bias]))
    res, par, nw = (t.contiguous() for t in (residual, partials, norm_weight))
    H, T, d = par.shape
    E = router_weight.shape[0]
    if T >= 2**31 or T * top_k >= 2**31 or (E + top_k) * 4 > 48 * 1024:
        raise ValueError("the CUDA route kernels support T*k < 2^31 and E <= 12000: split the batch")
    r, xn = torch.empty(T, d, dtype=par.dtype, device=par.device), torch.empty(T, d, dtype=par.dtype, device=par.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=par.device)
    weights = torch.empty(T, top_k, dtype=par.dtype, device=par.device)
    pairs = torch.empty(T * top_k, dtype=torch.int64, device=par.device)
    offsets = torch.empty(E + 1, dtype=torch.int64, device=par.device)
    if T:
        c = _constants()
        vec = 16 // par.element_size()
        vectorised = d % vec == 0 and all(t.data_ptr() % 16 == 0 for t in (res, par, nw, r, xn))
        _launch(f"foe_route_norm_{suffix}", par.device, (T,), c["FOE_NORM_THREADS"],
                [_ptr(res), np.int64(0 if res.shape[0] == 1 else T * d), _ptr(par), _ptr(nw), np.float32(eps),
                 np.int32(H), np.int64(T), np.int64(d), np.int32(vectorised), _ptr(r), _ptr(xn)])
        logits = torch.nn.functional.linear(xn, router_weight, router_bias).contiguous()  # [T, E] in the dtype, cuBLAS
        correction = None if correction_bias is None else correction_bias.float().contiguous()
        scale = None if expert_scale is None else expert_scale.float().contiguous()  # [E] fp32
        per_warp = 4 * (E + top_k)
        warps = max(1, min(c["FOE_TOPK_WARPS"], 48 * 1024 // per_warp, T))
        _launch(f"foe_route_topk_{suffix}", par.device, (-(-T // warps),), 32 * warps,
                [_ptr(logits), np.int64(T), np.int32(E), np.int32(num_groups), np.int32(top_k),
                 np.int32(bool(renormalize)), np.int32(SCORING_CODE[scoring]), _optional_ptr(correction),
                 np.float32(routed_scaling), np.int32(n_group), np.int32(topk_group), np.int32(bool(group_fill_zero)),
                 _optional_ptr(scale), np.float32(renorm_eps), np.float32(renorm_min), np.int32(bool(topk_first)),
                 _ptr(ids), _ptr(weights)], warps * per_warp)
    _group_by_expert(ids, E, pairs, offsets)
    return r, xn, ids, weights, pairs, offsets


def _optional_ptr(t: Tensor | None) -> np.uint64:
    """A bias pointer as the kernels take it: null when absent."""
    return np.uint64(0) if t is None else _ptr(t)


def experts_swiglu(x: Tensor, gate_up: Tensor, down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                   sorted_pairs: Tensor, expert_offsets: Tensor, num_groups: int, activation: str = "silu",
                   gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None, alpha: float = 1.0,
                   limit: float | None = None, up_offset: float = 0.0, weight_input: bool = False) -> Tensor:
    ops.check_experts_args(x, gate_up, down, topk_ids, sorted_pairs, expert_offsets, num_groups, activation,
                           gate_up_bias, down_bias, alpha, limit, up_offset, weight_input)
    biases = [b for b in (gate_up_bias, down_bias) if b is not None]
    suffix = _check_dtype(x, gate_up, down, topk_weights, *biases)
    _check_routing_tensors(topk_ids, topk_weights, sorted_pairs, expert_offsets, x.device)
    xs, gu, dn, ids, weights, pairs = (t.contiguous() for t in (x, gate_up, down, topk_ids, topk_weights, sorted_pairs))
    gu_bias, dn_bias = (None if b is None else b.contiguous() for b in (gate_up_bias, down_bias))
    T, d = xs.shape
    k, E = ids.shape[1], gu.shape[0]
    inter = gu.shape[1] // 2 if activation in reference.GATED_ACTIVATIONS else gu.shape[1]
    c = _constants()
    rows = c["FOE_ROWS_PER_BLOCK"]
    threads = 32 * rows  # FOE_EXPERT_THREADS: one warp per row
    out = torch.empty(num_groups, T, d, dtype=xs.dtype, device=xs.device)      # [G, T, d], fully written
    hidden = torch.empty(T * k, inter, dtype=torch.float32, device=xs.device)  # [T*k, I] by pair id
    if T * k == 0:
        return out
    unit = [np.int32(c[f"FOE_ACT_{activation.upper()}"]), np.float32(alpha),
            np.float32(np.inf if limit is None else limit), np.float32(up_offset)]  # no limit: +inf clamps nothing
    # The routing weights scale either the input (up kernel) or the output (down kernel); null elsewhere.
    input_weights, output_weights = (weights, None) if weight_input else (None, weights)
    _launch(f"foe_experts_up_{suffix}", xs.device, (T * k, -(-inter // rows)), threads,
            [_ptr(xs), _ptr(gu), _optional_ptr(gu_bias), _ptr(ids), _ptr(pairs), _optional_ptr(input_weights),
             np.int64(d), np.int64(inter), np.int32(k), *unit, _ptr(hidden)])
    _launch(f"foe_experts_down_{suffix}", xs.device, (T * num_groups, -(-d // rows)), threads,
            [_ptr(dn), _optional_ptr(dn_bias), _ptr(ids), _optional_ptr(output_weights), _ptr(hidden), np.int64(d),
             np.int64(inter), np.int32(k), np.int32(E // num_groups), np.int32(num_groups), np.int64(T), _ptr(out)])
    return out


if UNAVAILABLE_REASON is None:
    dispatch.register("sum_route_dispatch", "cupy", ("cuda",), features=dispatch.FEATURES["sum_route_dispatch"])(
        sum_route_dispatch)
    dispatch.register("experts_swiglu", "cupy", ("cuda",), features=dispatch.FEATURES["experts_swiglu"])(experts_swiglu)
