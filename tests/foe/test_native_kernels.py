"""The compiled kernels (foe_compile._C: C++ on CPU, CUDA on GPUs) against the plain reference."""
import os
import subprocess
import sys

import pytest
import torch

from foe_compile.kernels import dispatch, native, reference

from native_cases import ROUTINGS, check_experts, check_graph_replay, check_route, experts_inputs, route_inputs

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
