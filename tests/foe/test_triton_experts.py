"""Triton experts_swiglu vs the plain reference.

CPU: through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before anything
imports Triton) at tiny sizes. GPU (marked `gpu`): the DESIGN.md layer shapes, T = 4097, a T*k*d > 2^31 case and
CUDA-graph capture/replay.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from foe_compile.kernels import dispatch, reference  # noqa: E402
from foe_compile.kernels import triton_experts as te  # noqa: E402

if not torch.cuda.is_available() and not te.INTERPRETED:
    pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)",
                allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (atol, rtol) against the reference run in the same dtype.
TOLERANCE = {
    torch.float32: (2e-5, 1e-5),   # same math; only the summation order differs
    # The reference rounds gate/up, silu*up, the weighted row and every index_add_ to the
    # low-precision dtype; the kernel keeps fp32 until h, y and out: a few ulps apart.
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def make_case(T, d, I, E, k, groups, dtype=torch.float32, device=DEVICE, seed=0, experts=None):
    """Inputs of one experts_swiglu call with quota routing (k/H picks in each of H blocks)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = rand(T, d).to(dtype)
    gate_up = rand(E, 2 * I, d) / d ** 0.5
    gate_up[:, I:] *= 0.5  # asymmetric halves, so a gate/up swap changes the result
    down = (rand(E, d, I) / I ** 0.5).to(dtype)
    scores = torch.rand(T, E, generator=gen, device=device)
    if experts is not None:  # only these experts may be picked: the others stay empty
        scores[:, [e for e in range(E) if e not in experts]] = -1.0
    _, ids = reference.route(scores, groups, k)
    weights = torch.rand(T, k, generator=gen, device=device).to(dtype)
    pairs, offsets = reference.group_by_expert(ids, E)
    return x, gate_up.to(dtype), down, ids, weights, pairs, offsets, groups


def check(case, dtype=torch.float32):
    out = te.experts_swiglu(*case)
    ref = reference.experts_swiglu(*case)
    atol, rtol = TOLERANCE[dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    return out


# ---- CPU (interpreter) and GPU: tiny, awkward shapes -----------------------------------------

@pytest.mark.parametrize("T,E,k,groups", [
    (0, 5, 2, 1), (1, 5, 1, 1), (7, 5, 2, 1), (111, 5, 2, 1),    # E = 5: not a power of two
    (1, 6, 4, 2), (7, 6, 2, 2), (111, 6, 4, 2),                    # k/H = 1 and 2
])
def test_matches_reference(T, E, k, groups):
    check(make_case(T, 40, 24, E, k, groups))  # d = 40, I = 24: partial K and N tiles


def test_empty_experts():
    out = check(make_case(33, 40, 24, 8, 2, 1, experts=(0, 3, 7)))
    assert out.abs().sum() > 0


def test_non_contiguous_inputs():
    x, gate_up, down, ids, weights, pairs, offsets, groups = make_case(19, 40, 24, 5, 2, 1)
    x_nc = torch.stack([x, -x], dim=-1)[..., 0]                  # stride (2d, 2)
    down_nc = down.transpose(1, 2).contiguous().transpose(1, 2)  # [E, d, I] with strides (dI, 1, d)
    weights_nc = weights.t().contiguous().t()                   # [T, k] column-major
    assert not (x_nc.is_contiguous() or down_nc.is_contiguous() or weights_nc.is_contiguous())
    out = te.experts_swiglu(x_nc, gate_up, down_nc, ids, weights_nc, pairs, offsets, groups)
    torch.testing.assert_close(out, reference.experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, groups),
                               atol=TOLERANCE[torch.float32][0], rtol=TOLERANCE[torch.float32][1])


def test_gate_up_order():
    x, gate_up, down, ids, weights, pairs, offsets, groups = case = make_case(7, 40, 24, 5, 2, 1)
    swapped = torch.cat(gate_up.chunk(2, dim=1)[::-1], dim=1)
    wrong = reference.experts_swiglu(x, swapped, down, ids, weights, pairs, offsets, groups)
    out = check(case)
    assert (out - wrong).abs().max() > 100 * TOLERANCE[torch.float32][0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check(make_case(19, 40, 24, 6, 2, 2, dtype=dtype), dtype)


def test_routing_weights_deterministic():
    case = make_case(45, 40, 24, 5, 2, 1)
    assert torch.equal(te.experts_swiglu(*case), te.experts_swiglu(*case))


def test_int64_row_addressing():
    """Token rows 2^31 elements apart: x row offsets overflow if computed in int32.

    The storage is 4 GiB of virtual memory of which only the rows used are touched."""
    T, d, stride = 5, 32, 2 ** 29 + 16
    try:
        storage = torch.empty((T - 1) * stride + d, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot reserve 4 GiB of address space here: {err}")
    x_far = storage.as_strided((T, d), (stride, 1))
    _, gate_up, down, ids, weights, pairs, offsets, groups = make_case(T, d, 16, 3, 2, 1, dtype=torch.float16)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=torch.float16)
    x_far.copy_(x)
    assert (T - 1) * stride > 2 ** 31
    out = te.experts_swiglu(x_far, gate_up, down, ids, weights, pairs, offsets, groups)
    atol, rtol = TOLERANCE[torch.float16]
    torch.testing.assert_close(out, reference.experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, groups),
                               atol=atol, rtol=rtol)


def test_dispatch_registration():
    assert dispatch.available("experts_swiglu", "triton", DEVICE)
    case = make_case(7, 40, 24, 5, 2, 1)
    with dispatch.use_backend("triton"):
        out = torch.ops.foe.experts_swiglu(*case)
    torch.testing.assert_close(out, reference.experts_swiglu(*case), atol=2e-5, rtol=1e-5)


def test_bad_arguments():
    x, gate_up, down, ids, weights, pairs, offsets, _ = make_case(3, 40, 24, 6, 2, 1)
    with pytest.raises(ValueError, match="num_groups"):
        te.experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, 4)
    with pytest.raises(TypeError, match="dtype"):
        te.experts_swiglu(x.double(), gate_up, down, ids, weights, pairs, offsets, 1)
    with pytest.raises(ValueError, match="unknown expert activation"):
        te.experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, 1, "swish")
    with pytest.raises(ValueError, match="shapes disagree"):  # relu2 is ungated: gate_up must be [E, I, d]
        te.experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, 1, "relu2")
    with pytest.raises(ValueError, match="shapes disagree"):
        te.experts_swiglu(x, gate_up, down, ids, weights, pairs, offsets, 1, "silu", gate_up.new_zeros(6, 24))


# ---- expert-unit variants (reference.expert_unit) --------------------------------------------

# (alpha, limit, up_offset): none, gpt-oss's, and a limit small enough that most gates and ups clamp.
UNIT_PARAMS = {"plain": (1.0, None, 0.0), "gpt_oss": (1.702, 7.0, 1.0), "clamping": (1.702, 0.3, 1.0)}
VARIANTS = [(act, params) for act in reference.GATED_ACTIVATIONS for params in UNIT_PARAMS] + [("relu2", "plain")]


def variant_case(activation, params, bias, groups=1, T=7, dtype=torch.float32, seed=0):
    """make_case's inputs followed by the unit's arguments (E = 6, d = 40, I = 24)."""
    x, gate_up, down, ids, weights, pairs, offsets, _ = make_case(T, 40, 24, 6, 2, groups, dtype=dtype, seed=seed)
    if activation == "relu2":  # ungated: [E, I, d], here a strided view of the gate rows
        gate_up = gate_up[:, :24]
    alpha, limit, up_offset = UNIT_PARAMS[params]
    if activation != "silu":  # alpha belongs to the silu unit (ops.check_experts_args)
        alpha = 1.0
    gate_up_bias = down_bias = None
    if bias:
        gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
        gate_up_bias = (torch.randn(6, gate_up.shape[1], generator=gen, device=DEVICE) / 2).to(dtype)
        down_bias = (torch.randn(40, 6, generator=gen, device=DEVICE) / 2).to(dtype).t()  # strides (1, E)
    return (x, gate_up, down, ids, weights, pairs, offsets, groups, activation, gate_up_bias, down_bias, alpha,
            limit, up_offset)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("activation,params", VARIANTS)
def test_unit_variants(activation, params, bias, groups):
    case = variant_case(activation, params, bias, groups)
    out = check(case)
    if params == "clamping":  # the limit changed the result: the clamp is exercised
        unclamped = reference.experts_swiglu(*case[:12], None, case[13])
        assert (out - unclamped).abs().max() > 100 * TOLERANCE[torch.float32][0]


@pytest.mark.parametrize("activation,params", [("gelu_tanh", "gpt_oss"), ("relu2", "plain")])
def test_unit_variants_no_tokens(activation, params):
    assert check(variant_case(activation, params, bias=True, groups=2, T=0)).shape == (2, 0, 40)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on the NaN row
@pytest.mark.parametrize("activation,params", [("silu", "clamping"), ("relu2", "plain")])
def test_unit_variants_propagate_nan(activation, params):
    """A NaN token stays NaN through the clamp and relu (torch's clamp/relu propagate it; a
    fmin/fmax would turn it into the limit or 0), and its rows only."""
    x, *rest = variant_case(activation, params, bias=True)
    x[2] = float("nan")
    out, ref = te.experts_swiglu(x, *rest), reference.experts_swiglu(x, *rest)
    assert out[:, 2].isnan().all()
    atol, rtol = TOLERANCE[torch.float32]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, equal_nan=True)


def test_unit_variant_low_precision():
    check(variant_case("silu", "gpt_oss", bias=True, groups=2, dtype=torch.bfloat16), torch.bfloat16)


def test_dispatch_selects_triton_for_variants():
    assert dispatch.features("experts_swiglu", "triton") == dispatch.FEATURES["experts_swiglu"]
    case = variant_case("gelu_tanh", "gpt_oss", bias=True, groups=2)
    needs = dispatch.experts_features(*case[8:])
    assert needs == {"gelu_tanh", "bias", "clamped"}
    with dispatch.use_backend("triton"):
        assert dispatch.kernel("experts_swiglu", torch.device(DEVICE), 7, 6, needs) is te.experts_swiglu
        out = torch.ops.foe.experts_swiglu(*case)
    atol, rtol = TOLERANCE[torch.float32]
    torch.testing.assert_close(out, reference.experts_swiglu(*case), atol=atol, rtol=rtol)


# ---- GPU only: full sizes, > 2^31 element buffers, CUDA graphs ------------------------------

LAYERS = {"qwen3": (2048, 768, 128, 8), "olmoe": (2048, 1024, 64, 8), "mixtral": (4096, 14336, 8, 2)}


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 64, 4097])
@pytest.mark.parametrize("layer", LAYERS)
def test_gpu_full_size(layer, T):
    d, I, E, k = LAYERS[layer]
    groups = 2
    check(make_case(T, d, I, E, k, groups, dtype=torch.bfloat16), torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_beyond_int32():
    """T*k*d = 2^31 + 2^21 elements in the y buffer (and T*k*I in h): rows past 2^31 must be right."""
    T, d, I, E, k = 65_600, 4096, 32, 8, 8
    case = make_case(T, d, I, E, k, 1, dtype=torch.bfloat16)
    assert T * k * d > 2 ** 31
    out = te.experts_swiglu(*case)
    tail = slice(T - 300, T)  # tokens whose y rows start beyond 2^31 elements
    ref = reference.experts_swiglu(*case)
    atol, rtol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out[:, tail], ref[:, tail], atol=atol, rtol=rtol)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@gpu
@needs_cuda
def test_gpu_cuda_graph_experts():
    case = make_case(8, 2048, 768, 128, 8, 2, dtype=torch.bfloat16)
    static = [t.clone() if isinstance(t, torch.Tensor) else t for t in case]
    te.experts_swiglu(*static)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = te.experts_swiglu(*static)
    new = make_case(8, 2048, 768, 128, 8, 2, dtype=torch.bfloat16, seed=5)
    for dst, src in zip(static[:-1], new[:-1]):
        dst.copy_(src)
    graph.replay()
    torch.testing.assert_close(out, te.experts_swiglu(*new), atol=0, rtol=0)


@gpu
@needs_cuda
def test_gpu_cuda_graph_route_and_experts():
    """Capture and replay sum_route_dispatch + experts_swiglu (auto backends) == eager."""
    if dispatch.choose("sum_route_dispatch", torch.device("cuda")) == "reference":
        pytest.skip("no capturable route backend here (the reference uses bincount, a host sync)")
    H, T, d, I, E, k = 2, 8, 2048, 768, 128, 8
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=gen).to("cuda", torch.bfloat16)
            for s in ((1, T, d), (H, T, d), (d,), (E, d))]
    _, gate_up, down, *_ = make_case(1, d, I, E, k, H, dtype=torch.bfloat16)

    def layer(residual, partials, norm_w, router_w):
        r, xn, ids, w, pairs, offsets = torch.ops.foe.sum_route_dispatch(residual, partials, norm_w, 1e-6, router_w,
                                                                         H, k, True)
        return torch.ops.foe.experts_swiglu(xn, gate_up, down, ids, w, pairs, offsets, H) + r

    with dispatch.use_backend("auto"):
        layer(*args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*args)
        for t in args[:2]:
            t.normal_()
        graph.replay()
        torch.testing.assert_close(out, layer(*args), atol=0, rtol=0)


# ---- launch configurations (JSON data, one naming function) ---------------------------------

def test_shipped_configs_load_and_validate():
    from foe_compile.kernels import launch_configs as lc
    files = sorted(lc.CONFIG_DIR.glob("*.json"))
    assert files
    for path in files:
        table = lc._load(path.name, (lc.CONFIG_DIR,))
        assert table and all(lc.validate(cfg) for cfg in table.values())


def test_config_lookup_nearest_override_and_fallback(tmp_path, monkeypatch):
    from foe_compile.kernels import launch_configs as lc
    dev = torch.device("cpu")
    small = {"BLOCK_M": 16, "gate_up": lc._gemm(32, 64, 1, 4, 2), "down": lc._gemm(32, 64, 1, 4, 2)}
    big = {"BLOCK_M": 64, "gate_up": lc._gemm(64, 64, 8, 4, 2), "down": lc._gemm(64, 64, 8, 4, 2)}
    path = tmp_path / lc.config_filename(5, 24, 40, torch.float32, lc.device_name(dev))
    lc.write_configs(path, {1: small, 512: big}, untuned=False, note="test")
    assert lc.get_config(5, 24, 40, 2, 100, torch.float32, dev) == lc.default_config(100, 5, 2)  # not in the path
    monkeypatch.setenv("FOE_CONFIG_DIR", str(tmp_path))
    assert lc.get_config(5, 24, 40, 2, 100, torch.float32, dev) == small   # nearest key: 1
    assert lc.get_config(5, 24, 40, 2, 300, torch.float32, dev) == big     # nearest key: 512
    check(make_case(45, 40, 24, 5, 2, 1))                                  # the kernels run with the file's config
    with pytest.raises(ValueError, match="powers of two"):
        lc.validate(dict(small, BLOCK_M=24))


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_shipped_configs():
    """Every shipped launch configuration compiles for sm_90 (Triton's bundled ptxas, no GPU) and
    fits H100/H200 shared memory (227 KiB per block)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_aot.py"))], capture_output=True,
                          text=True, env=env, timeout=600)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this Triton wheel has no ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shared
    for name, (gate_up, down) in shared.items():
        assert 0 < gate_up <= 227 * 1024 and 0 < down <= 227 * 1024, (name, gate_up, down)
