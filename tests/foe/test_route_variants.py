"""Router variants of foe::sum_route_dispatch (scoring softmax / sigmoid / sqrtsoftplus, router_bias,
correction_bias, routed_scaling): the native kernels against reference.py, the NaN contract, autograd through
the variants, argument checks, the dispatcher's feature rule, and the ONNX lowering."""
from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F

from foe_compile.kernels import cupy_runtime, dispatch, native, reference
from foe_testing import gpu_backend_params
from native_cases import check_route_variant, route_inputs, route_variant

needs_native = pytest.mark.skipif(native.UNAVAILABLE_REASON is not None, reason=str(native.UNAVAILABLE_REASON))
DTYPES = [torch.float32, torch.bfloat16]
E, K = 12, 4


def route_native(*args):
    return torch.ops.foe.sum_route_dispatch_native(*args)


def variant_args(T, H, renormalize, dtype=torch.float32, device="cpu", seed=0):
    args = list(route_inputs(T, E, K, H, dtype=dtype, device=device, seed=seed))
    args[7] = renormalize
    return tuple(args)


# ---- the C++ CPU kernel equals the reference for every variant ------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("H", [1, 2])
@pytest.mark.parametrize("routed_scaling", [1.0, 2.5])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("correction_bias", [False, True], ids=["", "corr"])
@pytest.mark.parametrize("router_bias", [False, True], ids=["", "rbias"])
@pytest.mark.parametrize("scoring", reference.SCORINGS)
def test_native_cpu_equals_reference(scoring, router_bias, correction_bias, renormalize, routed_scaling, H, dtype):
    args = variant_args(37, H, renormalize, dtype)
    variant = route_variant(E, scoring, router_bias, correction_bias, routed_scaling, dtype)
    check_route_variant(route_native(*args, *variant), args, variant, exact_ids=True)


@needs_native
def test_correction_bias_only_selects():
    """A large correction bias on expert 0 makes every token pick it, but its weight is its score."""
    args = variant_args(9, 1, False)
    cb = torch.zeros(E)
    cb[0] = 100.0
    r, xn, ids, weights, _, _ = route_native(*args, "sigmoid", None, cb, 1.0)
    assert (ids == 0).any(dim=1).all()
    scores = torch.sigmoid(F.linear(xn, args[4]).float())
    torch.testing.assert_close(weights, scores.gather(1, ids))
    assert (weights < 1).all()  # not the corrected selection (> 100)


@needs_native
@pytest.mark.parametrize("scoring", reference.SCORINGS)
def test_empty_batch(scoring):
    args = variant_args(0, 2, True)
    variant = route_variant(E, scoring, True, True, 2.5)
    got = route_native(*args, *variant)
    assert [tuple(t.shape) for t in got] == [(0, 48), (0, 48), (0, K), (0, K), (0,), (E + 1,)]
    assert not got[5].any()
    check_route_variant(got, args, variant)


@needs_native
@pytest.mark.parametrize("scoring", reference.SCORINGS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_nan_rows_follow_the_contract(scoring, renormalize):
    """A NaN / Inf token poisons its own row (weights NaN, ids torch.topk's in their blocks); a NaN router-bias
    entry makes that expert rank first in every row (NaN ranks above every number; softmax: the row is NaN), as
    in the reference."""
    args = list(variant_args(7, 2, renormalize))
    args[1] = args[1].clone()
    args[1][0, 1, 0] = float("nan")
    args[1][1, 3, 5] = float("inf")
    variant = route_variant(E, scoring, True, True, 2.5)
    got = route_native(*args, *variant)
    want = reference.sum_route_dispatch(*args, *variant)
    assert torch.equal(got[2], want[2]) and torch.equal(got[4], want[4]) and torch.equal(got[5], want[5])
    assert got[3][[1, 3]].isnan().all() and not got[3][[0, 2, 4, 5, 6]].isnan().any()
    torch.testing.assert_close(got[3], want[3], equal_nan=True)

    rb = variant[1].clone()
    rb[7] = float("nan")  # expert 7 (block 1 of H = 2): NaN score in every row
    clean = variant_args(7, 2, renormalize)
    got = route_native(*clean, scoring, rb, variant[2], 2.5)
    want = reference.sum_route_dispatch(*clean, scoring, rb, variant[2], 2.5)
    assert torch.equal(got[2], want[2])
    if scoring != "softmax":  # softmax: the whole row is NaN, picked in torch.topk's order among NaNs
        assert (got[2][:, K // 2:] == 7).any(dim=1).all()
    torch.testing.assert_close(got[3], want[3], equal_nan=True)


@needs_native
@pytest.mark.parametrize("scoring", ["sigmoid", "sqrtsoftplus"])
def test_exact_ties_resolve_like_torch_topk(scoring):
    args = list(variant_args(5, 2, True))
    args[4] = torch.zeros_like(args[4])  # every score equal
    got = route_native(*args, scoring, None, torch.zeros(E), 1.0)
    want = reference.sum_route_dispatch(*args, scoring, None, torch.zeros(E), 1.0)
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


# ---- the op boundary: opcheck, gradients, argument checks, dispatch --------------------------------------------

@needs_native
def test_opcheck_variants():
    args = variant_args(7, 2, True)
    variant = route_variant(E, "sigmoid", True, True, 2.5)
    torch.library.opcheck(torch.ops.foe.sum_route_dispatch_native.default, (*args, *variant))
    grads = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    rb = variant[1].clone().requires_grad_()
    torch.library.opcheck(torch.ops.foe.sum_route_dispatch.default, (*grads, "sqrtsoftplus", rb, variant[2], 2.5))


def per_token_loop(residual, partials, norm_weight, eps, router_weight, H, k, renormalize, scoring, router_bias,
                   correction_bias, routed_scaling):
    """Written here from the formulas, token by token: (r, xn, weights) with autograd, and the ids."""
    rs, xns, ws, idss = [], [], [], []
    block = router_weight.shape[0] // H
    for t in range(partials.shape[1]):
        r = (residual[:, t] + partials[:, t]).mean(0)
        xn = norm_weight * (r * torch.rsqrt(r.pow(2).mean() + eps))
        logits = router_weight @ xn + router_bias
        scores = {"softmax": lambda v: torch.softmax(v, 0), "sigmoid": torch.sigmoid,
                  "sqrtsoftplus": lambda v: torch.sqrt(torch.log1p(torch.exp(v)))}[scoring](logits)
        select = (scores + correction_bias).detach()
        ids = torch.cat([g * block + select[g * block:(g + 1) * block].topk(k // H).indices for g in range(H)])
        w = scores[ids]
        if renormalize:
            w = w / w.sum()
        rs.append(r), xns.append(xn), ws.append(w * routed_scaling), idss.append(ids)
    return torch.stack(rs), torch.stack(xns), torch.stack(ws), torch.stack(idss)


@needs_native
@pytest.mark.parametrize("scoring,renormalize", [("sigmoid", True), ("sqrtsoftplus", False), ("softmax", False)])
def test_gradients_match_a_per_token_loop(scoring, renormalize):
    args = variant_args(6, 2, renormalize)
    _, rb, cb, scaling = route_variant(E, scoring, True, True, 2.5)
    leaves = [t.clone().requires_grad_() for t in (args[0], args[1], args[2], args[4], rb)]
    mine = [t.clone().requires_grad_() for t in (args[0], args[1], args[2], args[4], rb)]
    g = torch.Generator().manual_seed(5)
    grad_r, grad_xn, grad_w = (torch.randn(6, 48, generator=g), torch.randn(6, 48, generator=g),
                               torch.randn(6, K, generator=g))
    with dispatch.use_backend("auto"):  # native forward on CPU, the recompute-based backward
        r, xn, ids, w, _, _ = torch.ops.foe.sum_route_dispatch(leaves[0], leaves[1], leaves[2], args[3], leaves[3],
                                                               2, K, renormalize, scoring, leaves[4], cb, scaling)
    ((r * grad_r).sum() + (xn * grad_xn).sum() + (w * grad_w).sum()).backward()
    r2, xn2, w2, ids2 = per_token_loop(mine[0], mine[1], mine[2], args[3], mine[3], 2, K, renormalize, scoring,
                                       mine[4], cb, scaling)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
    ((r2 * grad_r).sum() + (xn2 * grad_xn).sum() + (w2 * grad_w).sum()).backward()
    for name, got, want in zip(("residual", "partials", "norm_weight", "router_weight", "router_bias"), leaves, mine):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_correction_bias_gets_no_gradient():
    args = variant_args(4, 1, True)
    cb = torch.zeros(E, requires_grad=True)
    with dispatch.use_backend("reference"):
        w = torch.ops.foe.sum_route_dispatch(*args, "sigmoid", None, cb, 1.0)[3]
    assert not w.requires_grad or torch.autograd.grad(w.sum(), cb, allow_unused=True)[0] is None


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_bad_arguments_raise_value_errors(backend):
    if backend == "native" and native.UNAVAILABLE_REASON is not None:
        pytest.skip(native.UNAVAILABLE_REASON)
    args = variant_args(3, 1, True)
    public = torch.ops.foe.sum_route_dispatch
    calls = [public, route_native] if backend == "native" else [public]
    for call in calls:
        with dispatch.use_backend(backend), pytest.raises(ValueError, match="unknown router scoring 'tanh'"):
            call(*args, "tanh", None, None, 1.0)
        with dispatch.use_backend(backend), pytest.raises(ValueError, match=r"router_bias must be \[E\] = \[12\]"):
            call(*args, "sigmoid", torch.zeros(E + 1), None, 1.0)
        with dispatch.use_backend(backend), pytest.raises(ValueError, match=r"correction_bias must be \[E\] = \[12\]"):
            call(*args, "sigmoid", None, torch.zeros(1, E), 1.0)
        with dispatch.use_backend(backend), pytest.raises(ValueError, match="router_bias must have dtype"):
            call(*args, "sigmoid", torch.zeros(E, dtype=torch.float64), None, 1.0)
        with dispatch.use_backend(backend), pytest.raises(ValueError, match="routed_scaling must be finite"):
            call(*args, "sigmoid", None, None, float("inf"))
    with pytest.raises(ValueError, match="unknown router scoring"):
        dispatch.route_features("relu")


def test_route_features():
    assert dispatch.route_features() == frozenset()
    assert dispatch.route_features("sigmoid", None, torch.zeros(3), 2.5) == {"sigmoid", "correction_bias", "scaling"}
    assert dispatch.route_features("softmax", torch.zeros(3)) == {"router_bias"}
    assert dispatch.route_features("sigmoid", None, torch.zeros(3), 1.0, 4, 2, False, torch.ones(3), 1e-20) == {
        "sigmoid", "correction_bias", "group_limit", "expert_scale", "renorm_eps"}
    assert dispatch.route_features("softmax", renorm_min=1e-12, topk_first=True) == {"renorm_eps", "topk_first"}
    assert dispatch.FEATURES["sum_route_dispatch"] == {"sigmoid", "sqrtsoftplus", "router_bias", "correction_bias",
                                                       "scaling", "group_limit", "expert_scale", "renorm_eps",
                                                       "topk_first"}


@needs_native
def test_dispatcher_picks_native_for_a_sigmoid_call():
    cpu = torch.device("cpu")
    needs = dispatch.route_features("sigmoid", torch.zeros(E), torch.zeros(E), 2.5)
    assert dispatch.choose("sum_route_dispatch", cpu, needs=needs) == "native"
    args = variant_args(11, 2, True)
    variant = route_variant(E, "sigmoid", True, True, 2.5)
    with dispatch.use_backend("auto"):
        for got, want in zip(torch.ops.foe.sum_route_dispatch(*args, *variant), route_native(*args, *variant)):
            assert torch.equal(got, want)


@needs_native
def test_backend_without_features_falls_back_and_keeps_the_default_call(monkeypatch, caplog):
    """A backend registered without route features gets the schema's first 8 arguments on a default call; a
    variant call selected on it runs on the reference, with a warning naming the backend and the features."""
    seen = []

    def featureless(*args):
        seen.append(len(args))
        return torch.ops.foe.sum_route_dispatch_native(*args)

    key = ("sum_route_dispatch", "native")
    monkeypatch.setitem(dispatch._KERNELS, key, featureless)
    monkeypatch.setitem(dispatch._FEATURES, key, frozenset())
    monkeypatch.setattr(dispatch, "_warned", set())
    args = variant_args(5, 2, True)
    with dispatch.use_backend("native"):
        torch.ops.foe.sum_route_dispatch(*args)
        assert seen == [8]
        variant = route_variant(E, "sigmoid", False, True, 2.5)
        with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
            got = torch.ops.foe.sum_route_dispatch(*args, *variant)
    assert seen == [8]  # the variant call did not reach it
    assert "'native' does not implement foe::sum_route_dispatch with correction_bias, scaling, sigmoid" in caplog.text
    assert "running those calls on 'reference'" in caplog.text
    for a, b in zip(got, reference.sum_route_dispatch(*args, *variant)):
        assert torch.equal(a, b)


# ---- ONNX -----------------------------------------------------------------------------------------------------

class SigmoidCorrectedRouter(torch.nn.Module):
    """Calls foe::sum_route_dispatch with DeepSeek-V3's routing: sigmoid scores, correction bias, scaling."""

    def __init__(self, d=16, experts=8, groups=2, top_k=4, scoring="sigmoid", correction=True, renormalize=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = torch.nn.Parameter(1 + 0.1 * torch.randn(d, generator=g))
        self.router = torch.nn.Parameter(torch.randn(experts, d, generator=g) / d ** 0.5)
        self.register_buffer("router_bias", 0.3 * torch.randn(experts, generator=g))
        self.register_buffer("correction", 0.2 * torch.randn(experts, generator=g))
        self.groups, self.top_k, self.scoring, self.renormalize = groups, top_k, scoring, renormalize
        self.use_correction = correction

    def forward(self, x):
        partials = torch.stack([x, 0.5 * x])
        r, xn, ids, w, pairs, offsets = torch.ops.foe.sum_route_dispatch(
            x.unsqueeze(0), partials, self.norm, 1e-6, self.router, self.groups, self.top_k, self.renormalize,
            self.scoring, self.router_bias, self.correction if self.use_correction else None, 2.5)
        return r, xn, ids, w, pairs, offsets


@torch.no_grad()
@pytest.mark.parametrize("scoring,correction,renormalize", [("sigmoid", True, True), ("sqrtsoftplus", False, False),
                                                            ("softmax", True, False)])
def test_onnx_router_variants(tmp_path, scoring, correction, renormalize):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from foe_compile.export.onnx_export import to_onnx

    model = SigmoidCorrectedRouter(scoring=scoring, correction=correction, renormalize=renormalize).eval()
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    path = to_onnx(model, (x,), tmp_path / "route.onnx")
    graph = onnx.load(path)
    kinds = {n.op_type for n in graph.graph.node} | {n.op_type for f in graph.functions for n in f.node}
    assert {"sigmoid": "Sigmoid", "sqrtsoftplus": "Softplus", "softmax": "Softmax"}[scoring] in kinds
    assert ("GatherElements" in kinds) == correction
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for T in (9, 5):
        xt = torch.randn(T, 16, generator=torch.Generator().manual_seed(T))
        got = session.run(None, {session.get_inputs()[0].name: xt.numpy()})
        with dispatch.use_backend("reference"):
            want = model(xt)
        for name, a, b in zip(("r", "xn", "ids", "weights", "pairs", "offsets"), got, want):
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-5, atol=1e-6, msg=name)


# ---- GPU: native CUDA and CuPy (skipped without a CUDA device) -------------------------------------------------

GPU_CASES = list(itertools.product(reference.SCORINGS, [False, True], [False, True], [1.0, 2.5]))


def _gpu_implementations():
    return gpu_backend_params(("native", "cupy"))


def _gpu_route(backend):
    return route_native if backend == "native" else cupy_runtime.sum_route_dispatch


@pytest.mark.parametrize("backend", _gpu_implementations())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("scoring,router_bias,correction_bias,routed_scaling", GPU_CASES)
@pytest.mark.parametrize("T,H", [(0, 1), (111, 2), (4097, 1)])
def test_gpu_variants(backend, dtype, scoring, router_bias, correction_bias, routed_scaling, T, H):
    args = list(route_inputs(T, 60, 4, H, d=96, dtype=dtype, device="cuda"))
    variant = route_variant(60, scoring, router_bias, correction_bias, routed_scaling, dtype, "cuda")
    for renormalize in (False, True):
        args[7] = renormalize
        check_route_variant(_gpu_route(backend)(*args, *variant), tuple(args), variant, exact_ids=False)


@pytest.mark.parametrize("backend", _gpu_implementations())
@pytest.mark.parametrize("scoring", reference.SCORINGS)
def test_gpu_nan_rows(backend, scoring):
    args = list(variant_args(7, 2, True, device="cuda"))
    args[1] = args[1].clone()
    args[1][0, 1, 0] = float("nan")
    variant = route_variant(E, scoring, True, True, 2.5, device="cuda")
    r, xn, ids, weights, pairs, offsets = _gpu_route(backend)(*args, *variant)
    block = E // 2
    assert ((ids[:, :K // 2] >= 0) & (ids[:, :K // 2] < block)).all() and (ids[:, K // 2:] >= block).all()
    assert (ids[:, K // 2:] < E).all()
    assert weights[1].isnan().all() and not weights[[0, 2, 3, 4, 5, 6]].isnan().any()
    nan_ids = ids[1].view(2, K // 2)  # a NaN row: ties to the lower id, the lowest ids of each block
    assert torch.equal(nan_ids, torch.arange(K // 2, device="cuda") + block * torch.arange(2, device="cuda")[:, None])
    assert torch.equal(pairs, reference.group_by_expert(ids, E)[0])


@pytest.mark.parametrize("backend", _gpu_implementations())
def test_gpu_default_call_unchanged(backend):
    """The default call (no variant arguments) and the explicit defaults give the same bits."""
    args = route_inputs(111, 60, 8, 4, d=96, dtype=torch.bfloat16, device="cuda")
    for a, b in zip(_gpu_route(backend)(*args), _gpu_route(backend)(*args, "softmax", None, None, 1.0)):
        assert torch.equal(a, b)
