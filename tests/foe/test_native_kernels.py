"""The compiled kernels (foe_compile._C: C++ on CPU, CUDA on GPUs) against the plain reference."""
import os
import subprocess
import sys

import pytest
import torch

from foe_compile.kernels import dispatch, native, reference

from native_cases import ROUTINGS, TOL, check_experts, check_graph_replay, check_route, experts_inputs, route_inputs

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
