"""The compiled kernels (foe_compile._C: C++ on CPU, CUDA on GPUs) against the plain reference."""
import os
import subprocess
import sys

import pytest
import torch

from foe_compile.kernels import dispatch, native, reference

from native_cases import (CLAMPS, ROUTINGS, TOL, UNIT_TOL, UNITS, check_experts, check_graph_replay, check_route,
                          experts_inputs, experts_unit_inputs, route_inputs)

pytestmark = pytest.mark.skipif(native.UNAVAILABLE_REASON is not None, reason=str(native.UNAVAILABLE_REASON))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not native.has_cuda(),
                                reason="needs a CUDA device and foe_compile._C built with CUDA")
route_native = torch.ops.foe.sum_route_dispatch_native if native.UNAVAILABLE_REASON is None else None
experts_native = torch.ops.foe.experts_swiglu_native if native.UNAVAILABLE_REASON is None else None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("T", [0, 1, 7, 111, 4097])
@pytest.mark.parametrize("E,top_k,H", ROUTINGS)
def test_route_fp32_shapes(T, E, top_k, H):
    args = route_inputs(T, E, top_k, H, residual_groups=H if T % 2 else 1)
    check_route(route_native(*args), args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("residual_groups", ["one", "H"])
def test_route_dtypes_layouts(dtype, noncontiguous, residual_groups):
    E, top_k, H = 60, 8, 4
    args = route_inputs(111, E, top_k, H, dtype=dtype, noncontiguous=noncontiguous,
                        residual_groups=1 if residual_groups == "one" else H, seed=3)
    check_route(route_native(*args), args)


def test_route_identical_tokens_keep_token_order():
    # Every token is the same vector, so all route to the same two experts: each expert's pairs are
    # then every token in order, one slot apart by k.
    T, E, top_k = 300, 12, 2
    args = list(route_inputs(T, E, top_k, 1))
    args[0] = torch.zeros_like(args[0])
    args[1] = args[1][:, :1].expand_as(args[1])
    got = route_native(*args)
    check_route(got, tuple(args))
    counts = got[5].diff()
    assert sorted(counts.tolist())[-2:] == [T, T]
    for e in counts.nonzero().flatten().tolist():
        assert torch.equal(got[4][got[5][e]:got[5][e + 1]] // top_k, torch.arange(T))


@pytest.mark.parametrize("T", [0, 1, 7, 111])
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts(T, dtype):
    args = experts_inputs(T, 60, 4, 2, dtype=dtype)
    check_experts(experts_native(*args), args)


@pytest.mark.parametrize("activation,clamp", UNITS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("H", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_unit_variants(activation, clamp, bias, H, dtype):
    args = experts_unit_inputs(7, 12, 4, H, activation, bias, clamp, dtype=dtype)
    check_experts(experts_native(*args), args, UNIT_TOL)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu2"])
@pytest.mark.parametrize("T,E,top_k,H", [(0, 12, 4, 2), (5, 1, 1, 1)], ids=["T0", "E1"])
def test_experts_unit_variants_edge_shapes(activation, T, E, top_k, H):
    clamp = "none" if activation == "relu2" else "gpt_oss"
    args = experts_unit_inputs(T, E, top_k, H, activation, bias=True, clamp=clamp)
    got = experts_native(*args)
    assert got.shape == (H, T, 48)
    check_experts(got, args, UNIT_TOL)


def test_tight_limit_clamps_gate_and_up():
    # The "tight" variant must exercise the clamp: both halves exceed the limit and the result depends on it.
    args = experts_unit_inputs(7, 12, 4, 2, "silu", clamp="tight")
    x, gate_up, limit, inter = args[0], args[1], args[12], args[2].shape[-1]
    h = torch.einsum("td,erd->ter", x, gate_up)
    assert (h[..., :inter] > limit).any() and (h[..., inter:].abs() > limit).any()
    unclamped = args[:12] + (None,) + args[13:]
    assert not torch.allclose(reference.experts_swiglu(*args), reference.experts_swiglu(*unclamped), atol=1e-3)


def check_nan_token(activation: str, clamp: str, device: str = "cpu") -> None:
    """torch's clamp and relu keep a NaN (fminf/fmaxf would turn it into the limit or 0): a NaN token's rows stay
    NaN, the other rows are the reference's."""
    x, *rest = experts_unit_inputs(7, 12, 4, 2, activation, bias=True, clamp=clamp, device=device)
    x = x.clone()
    x[2] = float("nan")
    got = experts_native(x, *rest)
    assert got[:, 2].isnan().all()
    torch.testing.assert_close(got, reference.experts_swiglu(x, *rest), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("activation,clamp", [("silu", "tight"), ("relu2", "none")])
def test_experts_unit_variants_propagate_nan(activation, clamp):
    check_nan_token(activation, clamp)


def test_experts_refuse_bad_unit_args():
    args = experts_unit_inputs(3, 12, 2, 1, bias=True)[:8]
    gate_up_bias, down_bias = experts_unit_inputs(3, 12, 2, 1, bias=True)[9:11]
    with pytest.raises(ValueError, match="unknown expert activation 'swish'"):
        experts_native(*args, activation="swish")
    with pytest.raises(ValueError, match="applies to the silu unit only"):
        experts_native(*args, activation="gelu", alpha=1.702)
    with pytest.raises(ValueError, match="limit is NaN"):
        experts_native(*args, limit=float("nan"))
    with pytest.raises(RuntimeError, match=r"gate_up_bias must be \[E, 2I\] = \[12, 80\], got \[12, 40\]"):
        experts_native(*args, gate_up_bias=gate_up_bias[:, :40])
    with pytest.raises(RuntimeError, match=r"down_bias must be \[E, d\]"):
        experts_native(*args, down_bias=down_bias.t())
    with pytest.raises(RuntimeError, match="down_bias must have x's dtype"):
        experts_native(*args, down_bias=down_bias.double())
    relu2 = experts_unit_inputs(3, 12, 2, 1, "relu2")[:8]
    with pytest.raises(ValueError, match="gated units only"):
        experts_native(*relu2, activation="relu2", limit=7.0)
    with pytest.raises(RuntimeError, match=r"down must be \[E, d, I\]"):  # relu2 reads gate_up [E, I, d]
        experts_native(*args, activation="relu2")


@pytest.mark.parametrize("activation,clamp", [("silu", "gpt_oss"), ("relu2", "none")])
def test_opcheck_native_experts_unit_variants(activation, clamp):
    torch.library.opcheck(torch.ops.foe.experts_swiglu_native.default,
                          experts_unit_inputs(7, 12, 4, 2, activation, bias=True, clamp=clamp))


def test_public_op_runs_unit_variants_on_native_on_cpu():
    cpu = torch.device("cpu")
    bias = torch.zeros(12, 80)
    assert dispatch.choose("experts_swiglu", cpu, needs=dispatch.experts_features("gelu", bias, None)) == "native"
    for activation, clamp in UNITS:
        alpha, limit, up_offset = CLAMPS[clamp]
        needs = dispatch.experts_features(activation, bias, bias, alpha, limit, up_offset)
        assert dispatch.choose("experts_swiglu", cpu, needs=needs) == "native", (activation, clamp)
    args = experts_unit_inputs(7, 12, 4, 2, "gelu_tanh", bias=True, clamp="gpt_oss")
    with dispatch.use_backend("auto"):
        assert torch.equal(torch.ops.foe.experts_swiglu(*args), experts_native(*args))


# NaN contract (csrc/route_dispatch_cpu.cpp, kernels/route_dispatch.cuh): ids stay in their group's block, a
# poisoned row's weights are NaN like the reference's, other rows are untouched. (E, top_k, H): k = E and
# k/H * 64 <= E/H (torch.topk's partial_sort branch) included.
NAN_ROUTINGS = [(12, 2, 1), (60, 8, 4), (8, 8, 1), (130, 2, 1)]


def nan_route_inputs(E, top_k, H, dtype=torch.float32, device="cpu"):
    """T = 7; token 1 has a NaN partial, token 3 an Inf one (RMSNorm then gives NaN); the rest are finite."""
    args = list(route_inputs(7, E, top_k, H, dtype=dtype, device=device))
    args[1] = args[1].clone()
    args[1][0, 1, 0] = float("nan")
    args[1][H - 1, 3, :] = float("inf")
    return tuple(args)


def check_nan_rows(got, args, exact_ids: bool) -> None:
    want = reference.sum_route_dispatch(*args)
    r, xn, ids, weights, pairs, offsets = got
    E, H, top_k = args[4].shape[0], args[5], args[6]
    slot_group = torch.arange(top_k, device=ids.device) // (top_k // H)
    assert bool(((ids // (E // H)) == slot_group).all()), f"ids outside their block: {ids.tolist()}"
    assert bool((ids.sort(dim=1).values.diff(dim=1) > 0).all()), "an expert picked twice in one row"
    expect_pairs, expect_offsets = reference.group_by_expert(ids, E)
    assert torch.equal(pairs, expect_pairs) and torch.equal(offsets, expect_offsets)
    nan_rows = torch.tensor([False, True, False, True, False, False, False], device=ids.device)
    assert torch.equal(weights.isnan().all(dim=1), nan_rows) and torch.equal(weights.isnan().any(dim=1), nan_rows)
    assert torch.equal(weights.isnan(), want[3].isnan()) and torch.equal(xn.isnan(), want[1].isnan())
    rtol, atol = TOL[args[1].dtype]
    torch.testing.assert_close(r, want[0], rtol=rtol, atol=atol, equal_nan=True)
    if exact_ids:  # CPU: torch.topk's own order, NaN rows included
        assert torch.equal(ids, want[2]) and torch.equal(pairs, want[4]) and torch.equal(offsets, want[5])


@pytest.mark.parametrize("E,top_k,H", NAN_ROUTINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_nan_rows(E, top_k, H, dtype):
    args = nan_route_inputs(E, top_k, H, dtype)
    check_nan_rows(route_native(*args), args, exact_ids=True)


@pytest.mark.parametrize("E,top_k,H", NAN_ROUTINGS + [(64, 8, 8)])
def test_route_exact_ties_resolve_like_torch_topk(E, top_k, H):
    # A zero router makes every probability 1/E: the picks are torch.topk's tie order (not "lower id first").
    args = list(route_inputs(9, E, top_k, H, d=8))
    args[4] = torch.zeros_like(args[4])
    got, want = route_native(*args), reference.sum_route_dispatch(*args)
    assert torch.equal(got[2], want[2]) and torch.equal(got[4], want[4]) and torch.equal(got[5], want[5])


def test_experts_refuse_out_of_range_ids():
    x, gate_up, down, ids, weights, pairs, offsets, H = experts_inputs(3, 12, 2, 1)
    bad = ids.clone()
    bad[1, 0] = 12
    with pytest.raises(RuntimeError, match="not an expert id in"):
        experts_native(x, gate_up, down, bad, weights, pairs, offsets, H)


def test_experts_catch_gate_up_swap():
    x, gate_up, down, ids, weights, pairs, offsets, H = experts_inputs(3, 12, 2, 1)
    inter = down.shape[-1]
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    want = torch.zeros(1, 3, x.shape[1])
    for t in range(3):  # the formula, written out: down(silu(gate x) * up x), weighted
        for j in range(2):
            e = ids[t, j]
            want[0, t] += weights[t, j] * down[e] @ (torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t]))
    got = experts_native(x, gate_up, down, ids, weights, pairs, offsets, H)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    swapped = torch.cat([up, gate], dim=1)
    assert not torch.allclose(experts_native(x, swapped, down, ids, weights, pairs, offsets, H), want, atol=1e-3)


def test_opcheck_native_ops():
    torch.library.opcheck(torch.ops.foe.sum_route_dispatch_native.default, route_inputs(7, 12, 4, 2))
    torch.library.opcheck(torch.ops.foe.experts_swiglu_native.default, experts_inputs(7, 12, 4, 2))


def test_public_ops_dispatch_to_native_on_cpu():
    assert dispatch.choose("sum_route_dispatch", torch.device("cpu")) == "native"
    assert dispatch.choose("experts_swiglu", torch.device("cpu")) == "native"
    args = route_inputs(111, 60, 8, 4)
    with dispatch.use_backend("auto"):
        for got, want in zip(torch.ops.foe.sum_route_dispatch(*args), route_native(*args)):
            assert torch.equal(got, want)


def test_foe_kernels_reference_still_selects_the_reference():
    code = ("import torch; from foe_compile.kernels import dispatch, reference; "
            "print(dispatch.kernel('sum_route_dispatch', torch.device('cpu')) is reference.sum_route_dispatch)")
    env = dict(os.environ, FOE_KERNELS="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_bad_dtype_mix_says_what_to_do():
    args = list(route_inputs(7, 12, 4, 2))
    args[4] = args[4].double()
    with pytest.raises(RuntimeError, match="cast them"):
        route_native(*args)


def test_build_info():
    info = native.build_info()
    assert info["torch_version"] == torch.__version__ and isinstance(info["cuda"], bool)


# ---- CUDA kernels of the same ops (lent GPU) --------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [0, 1, 7, 111, 4097])
@pytest.mark.parametrize("E,top_k,H", ROUTINGS + [(128, 8, 4), (64, 8, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_cuda(T, E, top_k, H, dtype):
    args = route_inputs(T, E, top_k, H, d=96, dtype=dtype, device="cuda", noncontiguous=T == 111,
                        residual_groups=H if T % 2 else 1)
    check_route(route_native(*args), args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [0, 1, 7, 111])
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_cuda(T, dtype):
    args = experts_inputs(T, 60, 4, 2, dtype=dtype, device="cuda")
    check_experts(experts_native(*args), args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("activation,clamp", UNITS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_cuda_unit_variants(activation, clamp, bias, dtype):
    args = experts_unit_inputs(111, 60, 4, 2, activation, bias, clamp, dtype=dtype, device="cuda")
    check_experts(experts_native(*args), args, UNIT_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu2"])
@pytest.mark.parametrize("T,E,top_k,H", [(0, 12, 4, 2), (5, 1, 1, 1)], ids=["T0", "E1"])
def test_experts_cuda_unit_variants_edge_shapes(activation, T, E, top_k, H):
    clamp = "none" if activation == "relu2" else "gpt_oss"
    args = experts_unit_inputs(T, E, top_k, H, activation, bias=True, clamp=clamp, device="cuda")
    check_experts(experts_native(*args), args, UNIT_TOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("activation,clamp", [("silu", "tight"), ("relu2", "none")])
def test_experts_cuda_unit_variants_propagate_nan(activation, clamp):
    check_nan_token(activation, clamp, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager():
    check_graph_replay(route_native, experts_native)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 513, 65537])
def test_route_cuda_large_and_decode(T):
    # T=1: one-block grouping; 513*8 > FOE_GROUP_SMALL and 65537*8: the tile count/scan/place path.
    args = route_inputs(T, 128, 8, 4, d=64, dtype=torch.bfloat16, device="cuda", residual_groups=1)
    check_route(route_native(*args), args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_cuda_odd_hidden_size_scalar_path(dtype):
    args = route_inputs(33, 60, 8, 4, d=97, dtype=dtype, device="cuda", residual_groups=4)  # d % 8 != 0
    check_route(route_native(*args), args)


@pytest.mark.gpu
@needs_cuda
def test_route_cuda_bf16_logits_and_softmax_match_the_reference_exactly():
    # logits come from the reference's own F.linear call and the softmax follows ATen's warp-softmax order,
    # so wherever xn agrees bit for bit, picks may differ from the reference only on exact logit ties.
    args = route_inputs(256, 128, 8, 4, d=256, dtype=torch.bfloat16, device="cuda", seed=5)
    got, want = route_native(*args), reference.sum_route_dispatch(*args)
    check_route(got, args)
    same_xn = (got[1] == want[1]).all(dim=1)
    logits = torch.nn.functional.linear(want[1], args[4]).float()
    gaps = (logits.gather(1, got[2]) - logits.gather(1, want[2]))[same_xn]
    assert same_xn.any() and torch.equal(gaps, torch.zeros_like(gaps))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 600])
def test_route_cuda_graph_capture(T):
    args = list(route_inputs(T, 128, 8, 4, d=128, dtype=torch.bfloat16, device="cuda"))
    route_native(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route_native(*args)
    fresh = route_inputs(T, 128, 8, 4, d=128, dtype=torch.bfloat16, device="cuda", seed=11)
    for static, new in zip(args[:2], fresh[:2]):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, route_native(*args)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@needs_cuda
def test_route_cuda_fused_kernel_still_selectable():
    code = ("import torch, sys; sys.path.insert(0, 'tests/foe'); import foe_compile.kernels.native; "
            "from native_cases import check_route, route_inputs; "
            "args = route_inputs(111, 60, 8, 4, d=96, dtype=torch.bfloat16, device='cuda'); "
            "check_route(torch.ops.foe.sum_route_dispatch_native(*args), args); print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FOE_CUDA_ROUTE="fused"), cwd=root,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["split", "fused"])
@pytest.mark.parametrize("E,top_k,H", NAN_ROUTINGS + [(128, 8, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_cuda_nan_rows(monkeypatch, mode, E, top_k, H, dtype):
    # Before the fix the fused kernel emitted id E for a NaN row (out of bounds in the grouping kernels).
    if mode == "fused":
        monkeypatch.setenv("FOE_CUDA_ROUTE", "fused")  # read on every call (route_dispatch_cuda.cu)
    args = nan_route_inputs(E, top_k, H, dtype, device="cuda")
    got = route_native(*args)
    torch.cuda.synchronize()
    check_nan_rows(got, args, exact_ids=False)  # CUDA ties (NaN rows too) go to the lower id
    block = E // H
    nan_ids = got[2][1].view(H, top_k // H)  # a NaN row: the lowest ids of each block, in order
    assert torch.equal(nan_ids, torch.arange(top_k // H, device="cuda") + block * torch.arange(H, device="cuda")[:, None])
