"""foe::experts_swiglu with weight_input (Llama 4): the routing weight scales the expert's input, not its output.

Every implementation (reference, C++, Triton through its CPU interpreter, ONNX Runtime; native CUDA and CuPy on a
GPU) against a plain-PyTorch implementation written here the way Llama 4 computes it: every expert on every
token, its input scaled by a [T, E] weight matrix that is 0 off the picks, summed over the experts.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from foe_compile.kernels import dispatch, reference
from foe_testing import gpu_backend_params

UNITS = {"silu": lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
         "gelu": lambda h: F.gelu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
         "relu2": lambda h: torch.relu(h) ** 2}
CASES = [(0, 4, 2, 1), (1, 4, 2, 2), (19, 6, 2, 1), (7, 8, 4, 2)]  # (T, E, k, H)
# (rtol, atol) against the dense implementation (same inputs, same dtype)
TOLERANCE = {
    torch.float32: (1e-5, 2e-5),  # summation order only
    # the kernels round w * x, gate/up and the unit where the reference does; the dense sum over E rounds once
    torch.bfloat16: (2e-2, 3e-2),
}


def dense_llama_style(x, gate_up, down, ids, weights, num_groups, activation="silu"):
    """out[g] = sum over the experts e of group g of down_e unit(gate_up_e (W[:, e] * x)), W = weights scattered
    into zeros [T, E]: the experts not picked see the input 0 and give 0 (no biases)."""
    T, E = x.shape[0], gate_up.shape[0]
    W = torch.zeros(T, E, dtype=weights.dtype).scatter(1, ids, weights)
    per_expert = torch.stack([F.linear(UNITS[activation](F.linear(W[:, e:e + 1] * x, gate_up[e])), down[e])
                              for e in range(E)])  # [E, T, d]
    return per_expert.view(num_groups, E // num_groups, T, x.shape[1]).sum(1)


def make_case(T, E, k, H, dtype=torch.float32, activation="silu", device="cpu", d=16, inner=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = inner if activation == "relu2" else 2 * inner
    x = torch.randn(T, d, generator=g)
    gate_up = torch.randn(E, rows, d, generator=g) / d ** 0.5
    gate_up[:, rows // 2:] *= 0.25  # gate/up asymmetric
    down = torch.randn(E, d, inner, generator=g) / inner ** 0.5
    _, ids = reference.route(torch.rand(T, E, generator=g), H, k)
    weights = torch.rand(T, k, generator=g) * 2  # > 1 too: input scaling is not output scaling
    pairs, offsets = reference.group_by_expert(ids, E)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    ids, pairs, offsets = ids.to(device), pairs.to(device), offsets.to(device)
    return (to(x), to(gate_up), to(down), ids, to(weights), pairs, offsets, H, activation, None, None, 1.0, None, 0.0,
            True)


def check(got, case):
    x, gate_up, down, ids, weights, _, _, H, activation = case[:9]
    rtol, atol = TOLERANCE[x.dtype]
    x, gate_up, down, weights = (t.cpu().float() for t in (x, gate_up, down, weights))
    want = dense_llama_style(x, gate_up, down, ids.cpu(), weights, H, activation)
    torch.testing.assert_close(got.cpu().float(), want, rtol=rtol, atol=atol)
    if x.shape[0]:  # weighting the output instead would differ
        pairs, offsets = (t.cpu() for t in case[5:7])
        unweighted = reference.experts_swiglu(x, gate_up, down, ids.cpu(), weights, pairs, offsets, *case[7:-1], False)
        assert not torch.allclose(unweighted, want, rtol=1e-2, atol=1e-2)


def cpu_backends():
    found = ["reference", "native"] + (["triton"] if dispatch.available("experts_swiglu", "triton", "cpu") else [])
    return [pytest.param(b, marks=pytest.mark.skipif(not dispatch.available("experts_swiglu", b, "cpu"),
                                                     reason="foe_compile._C is not built")) for b in found]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("T, E, k, H", CASES)
@pytest.mark.parametrize("activation", list(UNITS))
def test_cpu_implementations_weight_the_input(backend, T, E, k, H, activation):
    case = make_case(T, E, k, H, activation=activation)
    with dispatch.use_backend(backend):
        check(torch.ops.foe.experts_swiglu(*case), case)


@pytest.mark.skipif(not dispatch.available("experts_swiglu", "native", "cpu"), reason="foe_compile._C is not built")
def test_native_bf16_rounds_like_the_reference():
    """bf16: w * x is formed in bf16 before the GEMM, as Llama 4's `routed_in * scores`."""
    case = make_case(19, 6, 2, 1, dtype=torch.bfloat16)
    with dispatch.use_backend("native"):
        got = torch.ops.foe.experts_swiglu(*case)
    check(got, case)
    torch.testing.assert_close(got, reference.experts_swiglu(*case), rtol=1e-2, atol=1e-2)


def test_opcheck_and_gradients():
    """Schema, fake and autograd registration with weight_input; the gradients (x, stacked weights and the
    routing weights) equal autograd through the dense implementation."""
    case = make_case(6, 4, 2, 2)
    leaves = [t.clone().requires_grad_() for t in (case[0], case[1], case[2], case[4])]
    args = (*leaves[:3], case[3], leaves[3], *case[5:])
    opcheck(torch.ops.foe.experts_swiglu.default, args)
    torch.ops.foe.experts_swiglu(*args).square().sum().backward()
    mine = [t.clone().requires_grad_() for t in (case[0], case[1], case[2], case[4])]
    dense_llama_style(*mine[:3], case[3], mine[3], 2).square().sum().backward()
    for got, want in zip(leaves, mine):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_a_backend_without_the_feature_is_skipped_with_a_warning(monkeypatch, caplog):
    seen = []
    key = ("experts_swiglu", "native")
    monkeypatch.setitem(dispatch._KERNELS, key, lambda *args: seen.append(args))
    monkeypatch.setitem(dispatch._FEATURES, key, frozenset({"silu"}))
    monkeypatch.setattr(dispatch, "_warned", set())
    case = make_case(7, 4, 2, 1)
    with dispatch.use_backend("native"), caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        got = torch.ops.foe.experts_swiglu(*case)
    assert not seen and "'native' does not implement foe::experts_swiglu with weight_input" in caplog.text
    assert dispatch.experts_features(weight_input=True) == {"silu", "weight_input"}
    check(got, case)


class WeightedInputExperts(torch.nn.Module):
    """Calls foe::experts_swiglu with weight_input on routing computed from its input."""

    def __init__(self, E=4, k=2, H=2, d=16, inner=8):
        super().__init__()
        case = make_case(1, E, k, H, d=d, inner=inner)
        self.gate_up, self.down = torch.nn.Parameter(case[1]), torch.nn.Parameter(case[2])
        self.router = torch.nn.Parameter(torch.randn(E, d, generator=torch.Generator().manual_seed(3)))
        self.k, self.H = k, H

    def forward(self, x):
        w, ids = torch.topk(torch.sigmoid(x @ self.router.T), self.k, dim=-1)
        pairs, offsets = reference.group_by_expert(ids, self.gate_up.shape[0])
        return torch.ops.foe.experts_swiglu(x, self.gate_up, self.down, ids, w, pairs, offsets, self.H, "silu", None,
                                            None, 1.0, None, 0.0, True), ids, w


@torch.no_grad()
def test_onnx_runtime_weights_the_input(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from foe_compile.export.onnx_export import to_onnx

    model = WeightedInputExperts().eval()
    path = to_onnx(model, (torch.randn(9, 16),), tmp_path / "weight_input.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for T in (9, 5, 1):
        x = torch.randn(T, 16, generator=torch.Generator().manual_seed(T))
        got, ids, w = (torch.from_numpy(a) for a in session.run(None, {session.get_inputs()[0].name: x.numpy()}))
        torch.testing.assert_close(got, dense_llama_style(x, model.gate_up, model.down, ids, w, model.H),
                                   rtol=1e-5, atol=2e-5)


def gpu_backends():
    def no_experts_kernel(backend):
        if not dispatch.available("experts_swiglu", backend, "cuda"):
            return f"{backend} has no CUDA experts kernel here"
        return None

    return gpu_backend_params(("native", "cupy", "triton"), no_experts_kernel)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T, E, k, H", CASES + [(4097, 8, 2, 1)])
def test_gpu_implementations_weight_the_input(backend, dtype, T, E, k, H):
    case = make_case(T, E, k, H, dtype=dtype, device="cuda")
    with dispatch.use_backend(backend):
        check(torch.ops.foe.experts_swiglu(*case), case)
