"""Shared inputs and checks for the compiled foe:: kernels (C++, CUDA, CuPy) against reference.py.

Tolerances are per dtype (STYLE rule 8). sorted_pairs/expert_offsets must equal the stable grouping of
the kernel's ids exactly, and equal the reference's outputs exactly whenever the ids agree. ids may
differ from the reference only between experts whose logits are (near-)tied: torch.topk does not define
its tie order (the C++ kernel follows torch's CPU order; CUDA/CuPy take the lower id), bf16/fp16 logits tie often, and a GEMM with another
summation order can move a low-precision logit by an ulp. Such swaps are bounded by LOGIT_ATOL and by
MAX_SWAPPED (fraction of picks swapped on a near- but not exact tie); a wrong kernel picks experts whose logits are far apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from foe_compile.kernels import reference

# (rtol, atol) per dtype for float outputs of route (r, xn, weights) and experts (out).
TOL = {
    torch.float32: (1e-5, 1e-5),
    # r/xn/logits round exactly as the reference does; left over: RMSNorm's sum-of-squares order can move
    # xn by one ulp (bf16 ulp at 1 = 2^-7, fp16 = 2^-10), and GEMM accumulation order in the experts.
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
# Largest reference-logit gap between a kernel's pick and the reference's pick in the same slot: fp32
# GEMM order only; bf16/fp16 two ulps at |logit| < 4 (route_inputs scales the router so logits ~ N(0, 1)).
LOGIT_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-5, torch.float16: 2.0**-8}
MAX_SWAPPED = 0.01
# experts_swiglu's expert-unit variants: the outputs grow (up_offset, biases) and the clamp / alpha steps add
# roundings to the dtype, where inputs an ulp apart (GEMM order) can round either way.
UNIT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}
# (E, top_k, num_groups): E not a power of two, k/H in {1, 2}, H in {1, 2, 4}.
ROUTINGS = [(12, 2, 1), (12, 2, 2), (12, 4, 2), (60, 4, 4), (60, 8, 4), (60, 1, 1)]
# (alpha, limit, up_offset) of the expert unit (reference.expert_unit): none, gpt-oss's, and a limit that clamps
# about 40% of the gates and ups (experts_inputs: gate ~ N(0, 1), up ~ N(0, 1/16)). alpha is silu's only.
CLAMPS = {"none": (1.0, None, 0.0), "gpt_oss": (1.702, 7.0, 1.0), "tight": (1.0, 0.2, 0.5)}
# (activation, clamp) pairs the schema allows: limit / up_offset apply to gated units only.
UNITS = ([(a, c) for a in reference.GATED_ACTIVATIONS for c in CLAMPS]
         + [(a, "none") for a in reference.UNGATED_ACTIVATIONS])


def route_inputs(T: int, E: int, top_k: int, H: int, d: int = 48, dtype=torch.float32, device="cpu",
                 residual_groups: int = 1, noncontiguous: bool = False, seed: int = 0):
    """Arguments of foe::sum_route_dispatch; non-contiguous views when asked."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if noncontiguous:
        residual = rand(T, residual_groups, 2 * d).transpose(0, 1)[..., ::2]  # [Hr, T, d] strided
        partials = rand(T, H, d).transpose(0, 1)                               # [H, T, d] transposed
        router = rand(d, E).t() / d ** 0.5                                     # [E, d] transposed
    else:
        residual, partials, router = rand(residual_groups, T, d), rand(H, T, d), rand(E, d) / d ** 0.5
    norm_weight = 1 + 0.1 * rand(d)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(residual), to(partials), to(norm_weight), 1e-6, to(router), H, top_k, True


def check_route(got, args) -> None:
    """got = a kernel's outputs for `args`; compares with reference.sum_route_dispatch."""
    want = reference.sum_route_dispatch(*args)
    r, xn, ids, weights, pairs, offsets = got
    rtol, atol = TOL[args[1].dtype]
    torch.testing.assert_close(r, want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(xn, want[1], rtol=rtol, atol=atol)
    assert ids.dtype == pairs.dtype == offsets.dtype == torch.int64
    logits = F.linear(want[1], args[4]).float()  # the reference's logits
    differ = ids != want[2]
    if differ.any():
        gaps = (logits.gather(1, ids) - logits.gather(1, want[2]))[differ].abs()
        assert gaps.max().item() <= LOGIT_ATOL[args[1].dtype], f"picks differ beyond a tie: logit gap {gaps.max()}"
        near = (gaps > 0).sum().item()  # exact ties may go either way; near-ties only rarely
        assert near <= max(2, MAX_SWAPPED * ids.numel()), f"{near} picks swapped on near-ties"
    torch.testing.assert_close(weights, want[3], rtol=rtol, atol=atol)
    expect_pairs, expect_offsets = reference.group_by_expert(ids, args[4].shape[0])
    assert torch.equal(pairs, expect_pairs) and torch.equal(offsets, expect_offsets)
    if not differ.any():
        assert torch.equal(ids, want[2]) and torch.equal(pairs, want[4]) and torch.equal(offsets, want[5])


def experts_inputs(T: int, E: int, top_k: int, H: int, d: int = 48, inter: int = 40, dtype=torch.float32,
                   device="cpu", seed: int = 0):
    """Arguments of foe::experts_swiglu, routed by the reference; gate and up rows differ in scale."""
    route = reference.sum_route_dispatch(*route_inputs(T, E, top_k, H, d, torch.float32, "cpu", seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    gate_up = torch.randn(E, 2 * inter, d, generator=g) / d ** 0.5
    gate_up[:, inter:] *= 0.25  # asymmetric: a gate/up swap changes the result
    down = torch.randn(E, d, inter, generator=g) / inter ** 0.5
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    ids, weights, pairs, offsets = (t.to(device) for t in route[2:])
    return to(route[1]), to(gate_up), to(down), ids, to(weights), pairs, offsets, H


def experts_unit_inputs(T: int, E: int, top_k: int, H: int, activation: str = "silu", bias: bool = False,
                        clamp: str = "none", d: int = 48, inter: int = 40, dtype=torch.float32, device="cpu",
                        seed: int = 0) -> tuple:
    """All 14 arguments of foe::experts_swiglu for an expert-unit variant: experts_inputs' tensors (an ungated unit
    keeps gate_up's first I rows, [E, I, d]), biases when asked, CLAMPS[clamp] (alpha for silu only)."""
    x, gate_up, down, ids, weights, pairs, offsets, H = experts_inputs(T, E, top_k, H, d, inter, dtype, device, seed)
    if activation not in reference.GATED_ACTIVATIONS:
        gate_up = gate_up[:, :inter].contiguous()
    gate_up_bias = down_bias = None
    if bias:
        g = torch.Generator().manual_seed(seed + 2)
        gate_up_bias = (0.5 * torch.randn(E, gate_up.shape[1], generator=g)).to(device=device, dtype=dtype)
        down_bias = (0.1 * torch.randn(E, d, generator=g)).to(device=device, dtype=dtype)
    alpha, limit, up_offset = CLAMPS[clamp]
    alpha = alpha if activation == "silu" else 1.0
    return (x, gate_up, down, ids, weights, pairs, offsets, H, activation, gate_up_bias, down_bias, alpha, limit,
            up_offset)


def check_experts(got, args, tol: dict = TOL) -> None:
    want = reference.experts_swiglu(*args)
    rtol, atol = tol[args[0].dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def check_graph_replay(route, experts, E: int = 60, top_k: int = 8, H: int = 4, T: int = 64,
                       dtype=torch.bfloat16) -> None:
    """route + experts captured in one CUDA graph and replayed on new inputs equal eager, bit for bit."""
    args = list(route_inputs(T, E, top_k, H, d=128, dtype=dtype, device="cuda"))
    weights = experts_inputs(T, E, top_k, H, d=128, inter=96, dtype=dtype, device="cuda")[1:3]

    def layer():
        r, xn, ids, w, pairs, offsets = route(*args)
        return r, experts(xn, *weights, ids, w, pairs, offsets, H)

    layer()  # compile/load kernels and warm the allocator before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer()
    fresh = route_inputs(T, E, top_k, H, d=128, dtype=dtype, device="cuda", seed=7)
    for static, new in zip(args[:2], fresh[:2]):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = layer()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


# ---- router variants of foe::sum_route_dispatch (reference.sum_route_dispatch's scoring / biases / scaling) ----

def route_variant(E: int, scoring: str = "softmax", router_bias: bool = False, correction_bias: bool = False,
                  routed_scaling: float = 1.0, dtype=torch.float32, device="cpu", seed: int = 0) -> tuple:
    """The 4 router-variant arguments (scoring, router_bias [E] in `dtype`, correction_bias [E] fp32, scaling).
    The correction bias is of the scores' size (DeepSeek-V3's e_score_correction_bias), so it reorders picks."""
    g = torch.Generator().manual_seed(seed + 3)
    rb = (0.5 * torch.randn(E, generator=g)).to(device=device, dtype=dtype) if router_bias else None
    cb = (0.2 * torch.randn(E, generator=g)).to(device=device) if correction_bias else None
    return scoring, rb, cb, routed_scaling


def check_route_variant(got, args, variant, exact_ids: bool = True) -> None:
    """got = a kernel's outputs for args + variant; compares with reference.sum_route_dispatch. ids equal the
    reference's (exact_ids), or differ only between experts whose reference selection values are within
    LOGIT_ATOL (GPU kernels: another GEMM order, ties to the lower id)."""
    want = reference.sum_route_dispatch(*args, *variant)
    r, xn, ids, weights, pairs, offsets = got
    rtol, atol = TOL[args[1].dtype]
    torch.testing.assert_close(r, want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(xn, want[1], rtol=rtol, atol=atol)
    assert ids.dtype == pairs.dtype == offsets.dtype == torch.int64
    if exact_ids:
        assert torch.equal(ids, want[2])
    else:
        scoring, router_bias, correction_bias, _ = variant
        logits = F.linear(want[1], args[4], router_bias)
        select = reference.selection_scores(reference.router_scores(logits, scoring), correction_bias)
        differ = ids != want[2]
        if differ.any():
            gaps = (select.gather(1, ids) - select.gather(1, want[2]))[differ].abs()
            assert gaps.max().item() <= LOGIT_ATOL[args[1].dtype], f"picks differ beyond a tie: gap {gaps.max()}"
        if not differ.all():  # weights of the agreeing rows
            same = ~differ.any(dim=1)
            torch.testing.assert_close(weights[same], want[3][same], rtol=rtol, atol=atol)
    if exact_ids:
        torch.testing.assert_close(weights, want[3], rtol=rtol, atol=atol)
        assert torch.equal(pairs, want[4]) and torch.equal(offsets, want[5])
    expect_pairs, expect_offsets = reference.group_by_expert(ids, args[4].shape[0])
    assert torch.equal(pairs, expect_pairs) and torch.equal(offsets, expect_offsets)
