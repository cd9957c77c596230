"""The CuPy backend: csrc/kernels/*.cuh compiled with NVRTC at run time, against the reference (GPU only)."""
import pytest
import torch

from foe_compile.kernels import cupy_runtime, reference

from native_cases import (ROUTINGS, UNIT_TOL, UNITS, check_experts, check_graph_replay, check_route, experts_inputs,
                          experts_unit_inputs, route_inputs)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(cupy_runtime.UNAVAILABLE_REASON is not None, reason=str(cupy_runtime.UNAVAILABLE_REASON)),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("T", [0, 1, 7, 111, 4097])
@pytest.mark.parametrize("E,top_k,H", ROUTINGS + [(128, 8, 4), (64, 8, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route(T, E, top_k, H, dtype):
    args = route_inputs(T, E, top_k, H, d=96, dtype=dtype, device="cuda", noncontiguous=T == 111,
                        residual_groups=H if T % 2 else 1)
    check_route(cupy_runtime.sum_route_dispatch(*args), args)


@pytest.mark.parametrize("T", [0, 1, 7, 111])
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts(T, dtype):
    args = experts_inputs(T, 60, 4, 2, dtype=dtype, device="cuda")
    check_experts(cupy_runtime.experts_swiglu(*args), args)


@pytest.mark.parametrize("activation,clamp", UNITS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_unit_variants(activation, clamp, bias, dtype):
    args = experts_unit_inputs(111, 60, 4, 2, activation, bias, clamp, dtype=dtype, device="cuda")
    check_experts(cupy_runtime.experts_swiglu(*args), args, UNIT_TOL)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu2"])
@pytest.mark.parametrize("T,E,top_k,H", [(0, 12, 4, 2), (5, 1, 1, 1)], ids=["T0", "E1"])
def test_experts_unit_variants_edge_shapes(activation, T, E, top_k, H):
    clamp = "none" if activation == "relu2" else "gpt_oss"
    args = experts_unit_inputs(T, E, top_k, H, activation, bias=True, clamp=clamp, device="cuda")
    check_experts(cupy_runtime.experts_swiglu(*args), args, UNIT_TOL)


def test_experts_refuse_bias_of_another_dtype():
    args = experts_unit_inputs(7, 12, 4, 2, bias=True, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(TypeError, match="one dtype"):
        cupy_runtime.experts_swiglu(*args[:9], args[9].float(), *args[10:])


def test_cuda_graph_replay_equals_eager():
    check_graph_replay(cupy_runtime.sum_route_dispatch, cupy_runtime.experts_swiglu)


def test_runs_on_a_side_stream():
    args = route_inputs(111, 60, 8, 4, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cupy_runtime.sum_route_dispatch(*args)
    torch.cuda.current_stream().wait_stream(stream)
    check_route(got, args)


@pytest.mark.parametrize("T", [1, 513, 65537])
def test_route_large_and_decode(T):
    args = route_inputs(T, 128, 8, 4, d=64, dtype=torch.bfloat16, device="cuda")
    check_route(cupy_runtime.sum_route_dispatch(*args), args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_odd_hidden_size_scalar_path(dtype):
    args = route_inputs(33, 60, 8, 4, d=97, dtype=dtype, device="cuda", residual_groups=4)
    check_route(cupy_runtime.sum_route_dispatch(*args), args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,top_k,H", [(12, 2, 1), (60, 8, 4), (8, 8, 1), (128, 8, 4)])
def test_route_nan_rows(dtype, E, top_k, H):
    # The same .cuh as the native CUDA kernels: NaN ranks first, ids stay in their block, NaN rows' weights NaN.
    args = list(route_inputs(7, E, top_k, H, d=96, dtype=dtype, device="cuda"))
    args[1] = args[1].clone()
    args[1][0, 1, 0] = float("nan")
    r, xn, ids, weights, pairs, offsets = cupy_runtime.sum_route_dispatch(*args)
    torch.cuda.synchronize()
    assert bool(((ids // (E // H)) == torch.arange(top_k, device="cuda") // (top_k // H)).all())
    assert torch.equal(weights.isnan().any(dim=1), torch.arange(7, device="cuda") == 1)
    expect_pairs, expect_offsets = reference.group_by_expert(ids, E)
    assert torch.equal(pairs, expect_pairs) and torch.equal(offsets, expect_offsets)


def test_experts_refuse_int32_routing_tensors():
    # The kernels read ids and pairs as int64: an int32 tensor would be read past its end.
    x, gate_up, down, ids, weights, pairs, offsets, H = experts_inputs(7, 60, 4, 2, device="cuda")
    with pytest.raises(TypeError, match="int64"):
        cupy_runtime.experts_swiglu(x, gate_up, down, ids.int(), weights, pairs, offsets, H)
    with pytest.raises(TypeError, match="int64"):
        cupy_runtime.experts_swiglu(x, gate_up, down, ids, weights, pairs.int(), offsets, H)
