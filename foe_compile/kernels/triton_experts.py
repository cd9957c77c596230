"""Triton kernels for foe::experts_swiglu (formula in reference.py), vLLM fused_moe style.

Three launches, no host sync, static shapes (CUDA-graph capturable):

1. `_gate_up_swiglu_kernel`: grouped GEMM over the (token, slot) pairs sorted by expert. Each
   program owns one padded block of BLOCK_M sorted positions of one expert and one N tile of I;
   it reads x rows by indirect addressing (x[pairs[pos] // k], no permuted copy of x; scaled by
   the pair's routing weight and rounded to x's dtype when WEIGHT_INPUT, as Llama 4), computes
   the gate and up tiles together from gate_up's two halves (one tile for an ungated unit), adds
   the bias, applies the expert unit in fp32 and stores it -> dtype into h [T*k, I] at the sorted
   position.
2. `_down_weighted_kernel`: the same schedule over h; the epilogue adds the bias, multiplies by
   the routing weight (unless it scaled the input) and stores the row at its pair id p = t*k + j
   in y [T*k, d].
3. `_combine_kernel`: out[g, t] = sum_j [g(ids[t, j]) == g] y[t*k + j] in fp32, fixed j order.

Combine choice: deterministic (a k-row reduction per token, as vLLM's moe_sum) rather than fp32
atomics into out: it needs no zero-filled fp32 buffer nor a cast pass, gives bit-identical
results run to run, and handles the per-group outputs of FoE with a one-hot [G, BLOCK_D] sum.

Unit variants (reference.expert_unit): the activation and the presence of each bias and of the
limit are constexprs, so every variant compiles its own kernel without the others' branches
(relu2 has no up tile); alpha, limit and up_offset are runtime fp32 scalars (no recompile per
model). The clamp and relu propagate NaN as torch's do (Triton's default min/max are fmin/fmax,
which would turn a NaN token into finite values).

Block schedule (vLLM's moe_align, without a kernel of its own): expert e has
ceil(count_e / BLOCK_M) blocks; every GEMM program recomputes the prefix sum over the E+1
offsets (E <= a few hundred int64 loads, L2 resident) to find its expert and start. The grid is
the static upper bound cdiv(T*k, BLOCK_M) + min(E, T*k) blocks; programs past the real count exit.

Address arithmetic is int64: positions, pair ids, tokens and experts come from int64 tensors, so
products with strides are int64 (T*k*d beyond 2^31 is fine).

NOTE: Triton's CPU interpreter (3.6-3.9) computes bf16 `tl.dot` on the raw bits (errors ~1e10),
so under TRITON_INTERPRET=1 bf16 tiles are widened to fp32 before the dot (UPCAST); compiled
GPU kernels never take that branch.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import dispatch, launch_configs, reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; the "triton" backend is then absent
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if triton is not None:

    @triton.jit
    def _tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Grouped (L2-friendly) order: GROUP_M consecutive blocks share a sweep over the N tiles."""
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m

    @triton.jit
    def _block_of(offsets_ptr,  # [E+1] int64 first sorted position of each expert
                  pid_m, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """(total blocks, expert, first position, end position) of padded block pid_m."""
        e_idx = tl.arange(0, BLOCK_E)
        lo = tl.load(offsets_ptr + e_idx, mask=e_idx < E, other=0)
        hi = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < E, other=0)
        blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
        ends = tl.cumsum(blocks, axis=0)
        expert = tl.sum((ends <= pid_m).to(tl.int64), axis=0)
        mine = e_idx == expert
        first_block = tl.sum(tl.where(mine, ends - blocks, 0), axis=0)
        start = tl.sum(tl.where(mine, lo, 0), axis=0) + (pid_m - first_block) * BLOCK_M
        return tl.sum(blocks, axis=0), expert, start, tl.sum(tl.where(mine, hi, 0), axis=0)

    @triton.jit
    def _gated_unit(g, u, alpha, limit, up_offset, ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr):
        """act(gate) * (up + up_offset) in fp32, gate and up clamped first when HAS_LIMIT."""
        if HAS_LIMIT:  # torch's clamp: min(max(u, -limit), limit), also for a negative limit
            g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
            u = tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL)
            u = tl.minimum(u, limit, propagate_nan=tl.PropagateNan.ALL)
        if ACTIVATION == "silu":
            act = g * tl.sigmoid(alpha * g)
        elif ACTIVATION == "gelu":
            act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))  # erf(g / sqrt(2))
        else:  # gelu_tanh: 0.5 * (1 + tanh(z)) == sigmoid(2z); the interpreter has no tl tanh
            act = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # 2 * sqrt(2 / pi)
        return act * (u + up_offset)

    # NOTE: num_pid_m and T change with the token count; not specialising on them (divisibility by
    # 16) keeps one compiled variant per launch configuration.
    @triton.jit(do_not_specialize=["num_pid_m"])
    def _gate_up_swiglu_kernel(
        x_ptr,        # [T, d] activations, any strides; row t read for pair p = t*k + j
        w_ptr,        # [E, 2I, d] gate_up: gate rows [0, I), up rows [I, 2I); ungated (relu2): [E, I, d]
        b_ptr,        # [E, 2I] or [E, I] gate_up bias, any strides (None unless HAS_BIAS)
        h_ptr,        # [T*k, I] out, contiguous: the expert unit at the sorted position
        pairs_ptr,    # [T*k] int64 pair ids sorted by expert
        offsets_ptr,  # [E+1] int64 expert segments of pairs
        rw_ptr,       # [T, k] routing weights, any strides (read only when WEIGHT_INPUT)
        E, I, d, k, num_pid_m,
        stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_be, stride_bn, stride_rt, stride_rk,
        alpha, limit, up_offset,  # fp32 unit scalars (limit read only when HAS_LIMIT)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, WEIGHT_INPUT: tl.constexpr,
    ):
        pid_m, pid_n = _tile(tl.program_id(0), num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
        total, expert, start, end = _block_of(offsets_ptr, pid_m, E, BLOCK_M, BLOCK_E)
        if pid_m >= total:
            return
        pos = start + tl.arange(0, BLOCK_M)                       # [BM] int64
        row_ok = pos < end
        pair = tl.load(pairs_ptr + pos, mask=row_ok, other=0)
        token = pair // k
        if WEIGHT_INPUT:
            rw = tl.load(rw_ptr + token * stride_rt + (pair % k) * stride_rk, mask=row_ok, other=0.0)
            rw = rw.to(tl.float32)[:, None]                       # [BM, 1]
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < I
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + token[:, None] * stride_xt + kk[None, :] * stride_xd          # [BM, BK]
        rows = n[None, :].to(tl.int64)
        g_ptrs = w_ptr + expert * stride_we + rows * stride_wn + kk[:, None] * stride_wd         # [BK, BN]
        u_ptrs = w_ptr + expert * stride_we + (rows + I) * stride_wn + kk[:, None] * stride_wd  # [BK, BN]
        # An ungated unit has no up rows: every `if GATED` below is resolved at compile time.
        GATED: tl.constexpr = ACTIVATION != "relu2"
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            if EVEN_K:
                w_ok = n_ok[None, :]
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                k_ok = kk < d - k0
                w_ok = k_ok[:, None] & n_ok[None, :]
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if WEIGHT_INPUT:  # w * x rounded to x's dtype, as torch multiplies in the dtype
                a = (a.to(tl.float32) * rw).to(x_ptr.dtype.element_ty)
            g = tl.load(g_ptrs, mask=w_ok, other=0.0)
            if UPCAST:
                a, g = a.to(tl.float32), g.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            if GATED:
                u = tl.load(u_ptrs, mask=w_ok, other=0.0)
                if UPCAST:
                    u = u.to(tl.float32)
                acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
                u_ptrs += BLOCK_K * stride_wd
            a_ptrs += BLOCK_K * stride_xd
            g_ptrs += BLOCK_K * stride_wd
        if HAS_BIAS:
            b_ptrs = b_ptr + expert * stride_be + n.to(tl.int64) * stride_bn
            acc_g += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(b_ptrs + I * stride_bn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            h = _gated_unit(acc_g, acc_u, alpha, limit, up_offset, ACTIVATION, HAS_LIMIT)
        else:  # relu2
            h = tl.maximum(acc_g, 0.0, propagate_nan=tl.PropagateNan.ALL)
            h = h * h
        h_ptrs = h_ptr + pos[:, None] * I + n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["num_pid_m"])
    def _down_weighted_kernel(
        h_ptr,        # [T*k, I] contiguous expert-unit activations at sorted positions
        w_ptr,        # [E, d, I] down projection, any strides
        b_ptr,        # [E, d] down bias, any strides (None unless HAS_BIAS)
        y_ptr,        # [T*k, d] out, contiguous: weighted expert output at pair id p = t*k + j
        pairs_ptr,    # [T*k] int64 pair ids sorted by expert
        offsets_ptr,  # [E+1] int64 expert segments of pairs
        rw_ptr,       # [T, k] routing weights, any strides
        E, I, d, k, num_pid_m,
        stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_rt, stride_rk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        HAS_BIAS: tl.constexpr, WEIGHT_INPUT: tl.constexpr,
    ):
        pid_m, pid_n = _tile(tl.program_id(0), num_pid_m, tl.cdiv(d, BLOCK_N), GROUP_M)
        total, expert, start, end = _block_of(offsets_ptr, pid_m, E, BLOCK_M, BLOCK_E)
        if pid_m >= total:
            return
        pos = start + tl.arange(0, BLOCK_M)                       # [BM] int64
        row_ok = pos < end
        pair = tl.load(pairs_ptr + pos, mask=row_ok, other=0)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < d
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + pos[:, None] * I + kk[None, :]                                 # [BM, BK]
        b_ptrs = (w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn
                  + kk[:, None] * stride_wk)                                          # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = kk < I - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:  # the bias is part of the expert's output: weighted with it
            bias = tl.load(b_ptr + expert * stride_be + n.to(tl.int64) * stride_bn, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if not WEIGHT_INPUT:  # else the weight scaled the expert's input (first kernel)
            rw = tl.load(rw_ptr + (pair // k) * stride_rt + (pair % k) * stride_rk, mask=row_ok, other=0.0)
            acc = acc * rw.to(tl.float32)[:, None]
        y_ptrs = y_ptr + pair[:, None] * d + n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["T"])
    def _combine_kernel(
        y_ptr,        # [T*k, d] contiguous weighted expert outputs by pair id
        ids_ptr,      # [T, k] int64 contiguous expert ids
        out_ptr,      # [G, T, d] contiguous output
        T, d, k, experts_per_group, G,
        BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        c_ok = cols < d
        groups = tl.arange(0, BLOCK_G)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        for j in range(0, k):
            g = tl.load(ids_ptr + t * k + j) // experts_per_group
            y = tl.load(y_ptr + (t * k + j) * d + cols, mask=c_ok, other=0.0).to(tl.float32)
            acc += tl.where((groups == g)[:, None], y[None, :], 0.0)
        out_ptrs = out_ptr + (groups[:, None].to(tl.int64) * T + t) * d + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(groups < G)[:, None] & c_ok[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _bias_strides(bias: Tensor | None) -> tuple[int, int]:
    """An absent bias is never read (HAS_BIAS=False): any strides do."""
    return (0, 0) if bias is None else bias.stride()


def experts_swiglu(x: Tensor, gate_up: Tensor, down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                   sorted_pairs: Tensor, expert_offsets: Tensor, num_groups: int, activation: str = "silu",
                   gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None, alpha: float = 1.0,
                   limit: float | None = None, up_offset: float = 0.0, weight_input: bool = False, *,
                   config: dict | None = None) -> Tensor:
    """Launcher: validate, allocate h [T*k, I], y [T*k, d], out [G, T, d]; launch the three kernels.

    The arguments are the op schema's (the unit's as in reference.expert_unit). `config` overrides
    the launch configuration (the tuner's hook); by default it comes from `launch_configs.get_config`."""
    if triton is None:
        raise RuntimeError("the Triton experts kernels need `pip install triton`")
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"Triton kernels run on CUDA tensors (got {x.device}); on CPU set TRITON_INTERPRET=1 "
                           "before importing foe_compile, or use FOE_KERNELS=native/reference")
    if not (x.dtype == gate_up.dtype == down.dtype):
        raise TypeError(f"x, gate_up and down must share a dtype, got {x.dtype}, {gate_up.dtype}, {down.dtype}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}; the Triton kernels compute {reference.ACTIVATIONS}")
    gated = activation in reference.GATED_ACTIVATIONS
    E, rows, d = gate_up.shape
    I = rows // 2 if gated else rows
    T, k = topk_ids.shape
    if (x.shape != (T, d) or down.shape != (E, d, I) or (gated and rows % 2) or sorted_pairs.numel() != T * k
            or expert_offsets.numel() != E + 1 or (gate_up_bias is not None and gate_up_bias.shape != (E, rows))
            or (down_bias is not None and down_bias.shape != (E, d))):
        raise ValueError(f"experts_swiglu ({activation}) shapes disagree: x {tuple(x.shape)}, gate_up "
                         f"{tuple(gate_up.shape)}, down {tuple(down.shape)}, topk_ids {tuple(topk_ids.shape)}, "
                         f"sorted_pairs {tuple(sorted_pairs.shape)}, expert_offsets {tuple(expert_offsets.shape)}, "
                         f"biases {None if gate_up_bias is None else tuple(gate_up_bias.shape)}, "
                         f"{None if down_bias is None else tuple(down_bias.shape)}")
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide E={E}")
    out = x.new_empty(num_groups, T, d)
    if T == 0:
        return out
    cfg = config or launch_configs.get_config(E, I, d, k, T, x.dtype, x.device)
    ids = topk_ids.to(torch.int64).contiguous()
    pairs = sorted_pairs.to(torch.int64).contiguous()
    offsets = expert_offsets.to(torch.int64).contiguous()
    h = x.new_empty(T * k, I)
    y = x.new_empty(T * k, d)
    block_m = cfg["BLOCK_M"]
    num_pid_m = triton.cdiv(T * k, block_m) + min(E, T * k)
    common = dict(BLOCK_M=block_m, BLOCK_E=_pow2(E, 2),
                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  UPCAST=INTERPRETED and x.dtype == torch.bfloat16)
    gu, dn = cfg["gate_up"], cfg["down"]
    bn, bk = min(gu["BLOCK_N"], _pow2(I)), min(gu["BLOCK_K"], _pow2(d))
    _gate_up_swiglu_kernel[(num_pid_m * triton.cdiv(I, bn),)](
        x, gate_up, gate_up_bias, h, pairs, offsets, topk_weights, E, I, d, k, num_pid_m,
        x.stride(0), x.stride(1), *gate_up.stride(), *_bias_strides(gate_up_bias), *topk_weights.stride(),
        # float(): an int from a direct call would make Triton type (and specialise) the scalar as i32
        float(alpha), 0.0 if limit is None else float(limit), float(up_offset),
        BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gu["GROUP_M"], EVEN_K=d % bk == 0,
        ACTIVATION=activation, HAS_BIAS=gate_up_bias is not None, HAS_LIMIT=limit is not None,
        WEIGHT_INPUT=bool(weight_input),
        num_warps=gu["num_warps"], num_stages=gu["num_stages"], **common)
    bn, bk = min(dn["BLOCK_N"], _pow2(d)), min(dn["BLOCK_K"], _pow2(I))
    _down_weighted_kernel[(num_pid_m * triton.cdiv(d, bn),)](
        h, down, down_bias, y, pairs, offsets, topk_weights, E, I, d, k, num_pid_m,
        *down.stride(), *_bias_strides(down_bias), *topk_weights.stride(),
        BLOCK_N=bn, BLOCK_K=bk, GROUP_M=dn["GROUP_M"], EVEN_K=I % bk == 0, HAS_BIAS=down_bias is not None,
        WEIGHT_INPUT=bool(weight_input),
        num_warps=dn["num_warps"], num_stages=dn["num_stages"], **common)
    block_d = min(512, _pow2(d))
    _combine_kernel[(T, triton.cdiv(d, block_d))](
        y, ids, out, T, d, k, E // num_groups, num_groups,
        BLOCK_D=block_d, BLOCK_G=_pow2(num_groups, 1), num_warps=4)
    return out


def usable() -> bool:
    """Triton is installed and can launch here: a CUDA device, or the CPU interpreter."""
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


if usable():
    dispatch.register("experts_swiglu", "triton", device_types=("cuda", "cpu") if INTERPRETED else ("cuda",),
                      features=dispatch.FEATURES["experts_swiglu"])(experts_swiglu)
