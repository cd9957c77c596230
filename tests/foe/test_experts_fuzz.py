"""Property-based fuzzing of foe::experts_swiglu (hypothesis), split from test_op_fuzz.py, whose strategies,
tolerances and settings it imports: every implementation present on this machine against the plain-PyTorch
reference (reference.py), the routing weight on the output or input (weight_input), NaN / +-Inf inputs and a
NaN expert; the layer as a converted model runs it (route, then experts) with NaN rows; bad routing indices
(a clear error, never an out-of-bounds access); and a converted Hugging Face model given NaN.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the [test] extra)")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_op_fuzz import (DTYPES, EXPERTS_TOL, TOKENS, fuzz_settings, implementations, route_args,  # noqa: E402
                          route_cases, routings, run)

from foe_compile.kernels import dispatch, reference  # noqa: E402

# ---- experts_swiglu ------------------------------------------------------------------------------------

@st.composite
def experts_cases(draw, tokens=TOKENS, dims=(1, 3, 16, 24)):
    E, k, H = draw(routings())
    return dict(T=draw(st.sampled_from(tokens)), E=E, k=k, H=H, d=draw(st.sampled_from(dims)),
                inter=draw(st.sampled_from([1, 4, 12])), dtype=draw(st.sampled_from(DTYPES)),
                poison=draw(st.sampled_from(["none", "nan_x", "inf_x", "nan_weight", "nan_expert"])),
                rows=draw(st.lists(st.integers(0, 64), min_size=1, max_size=2)), seed=draw(st.integers(0, 2**16)),
                weight_input=draw(st.booleans()))


def experts_args(c: dict, device: str = "cpu"):
    """Arguments of foe::experts_swiglu: quota routing of random scores (ties included), asymmetric gate/up; with
    c["weight_input"] the unit arguments follow (default unit, the routing weight on the input)."""
    g = torch.Generator().manual_seed(c["seed"])
    T, E, k, H, d, inter, dtype = c["T"], c["E"], c["k"], c["H"], c["d"], c["inter"], c["dtype"]
    x = torch.randn(T, d, generator=g)
    gate_up = torch.randn(E, 2 * inter, d, generator=g) / d ** 0.5
    gate_up[:, inter:] *= 0.25  # a gate/up swap changes the result
    down = torch.randn(E, d, inter, generator=g) / inter ** 0.5
    scores = torch.randint(0, 3, (T, E), generator=g).float()  # coarse: tied scores
    _, ids = reference.route(scores, H, k)
    weights = torch.rand(T, k, generator=g)
    pairs, offsets = reference.group_by_expert(ids, E)
    rows = sorted({r % T for r in c["rows"]}) if T else []
    for i, t in enumerate(rows):
        if c["poison"] == "nan_x":
            x[t, i % d] = float("nan")
        elif c["poison"] == "inf_x":
            x[t, i % d] = float("inf") if i % 2 == 0 else float("-inf")
        elif c["poison"] == "nan_weight":
            weights[t, i % k] = float("nan")
    if c["poison"] == "nan_expert" and T:
        down[int(ids[0, 0])] = float("nan")  # corrupted weights of one expert
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    ids, pairs, offsets = ids.to(device), pairs.to(device), offsets.to(device)
    args = (to(x), to(gate_up), to(down), ids, to(weights), pairs, offsets, H)
    return (*args, "silu", None, None, 1.0, None, 0.0, True) if c.get("weight_input") else args


def check_experts(got, args) -> None:
    want = reference.experts_swiglu(*args)
    assert got.shape == want.shape and got.dtype == want.dtype
    rtol, atol = EXPERTS_TOL[args[0].dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


EXPERTS_IMPLS = implementations("experts_swiglu")


@pytest.mark.parametrize("backend,device", [p for p in EXPERTS_IMPLS if p.values[0] != "triton"])
@fuzz_settings(100)
@given(c=experts_cases())
def test_experts_match_reference(backend, device, c):
    args = experts_args(c, device)
    check_experts(run("experts_swiglu", backend, *args), args)


@pytest.mark.parametrize("backend,device", [p for p in EXPERTS_IMPLS if p.values[0] == "triton"] or
                         [pytest.param(None, None, marks=pytest.mark.skip(reason="Triton is not usable here"))])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on the NaN/Inf inputs
@fuzz_settings(6)
@given(c=experts_cases(tokens=[0, 1, 3, 7], dims=(1, 3, 16)))
def test_experts_triton_matches_reference(backend, device, c):
    """Triton: on CPU through the interpreter (slow), so few and tiny examples."""
    args = experts_args(c, device)
    check_experts(run("experts_swiglu", backend, *args), args)


@pytest.mark.parametrize("backend,device", implementations("sum_route_dispatch"))
@fuzz_settings(40)
@given(c=route_cases(), inter=st.sampled_from([1, 8]))
def test_route_then_experts_nan_rows_match_reference(backend, device, c, inter):
    """The layer as a converted model runs it: route, then experts on the routed outputs; NaN where the
    reference has NaN, close elsewhere."""
    args = route_args(c, device)
    r, xn, ids, weights, pairs, offsets = run("sum_route_dispatch", backend, *args)
    g = torch.Generator().manual_seed(c["seed"])
    E, d = c["E"], c["d"]
    gate_up = (torch.randn(E, 2 * inter, d, generator=g) / d ** 0.5).to(device=device, dtype=c["dtype"])
    down = (torch.randn(E, d, inter, generator=g) / inter ** 0.5).to(device=device, dtype=c["dtype"])
    experts_backend = backend if dispatch.available("experts_swiglu", backend, device) else "reference"
    out = run("experts_swiglu", experts_backend, xn, gate_up, down, ids, weights, pairs, offsets, c["H"])
    want = reference.experts_swiglu(xn, gate_up, down, ids, weights, pairs, offsets, c["H"])
    rtol, atol = EXPERTS_TOL[c["dtype"]]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol, equal_nan=True)
    # A token's outputs are NaN in its picked groups exactly when its routed row is.
    nan_tokens = weights.isnan().any(dim=1) | xn.isnan().any(dim=1)
    assert torch.equal(out.isnan().any(dim=2).any(dim=0), nan_tokens)


# ---- bad routing indices: a clear error, never an out-of-bounds access ---------------------------------

BAD_INDICES = {  # name -> (how to spoil (ids, pairs, offsets), the message the C++ check gives)
    "offsets_end": (lambda i, p, o: (i, p, o.index_fill(0, torch.tensor([o.numel() - 1]), p.numel() + 1)),
                    "end at T\\*k"),
    "offsets_start": (lambda i, p, o: (i, p, o.index_fill(0, torch.tensor([0]), 1)), "start at 0"),
    "offsets_decrease": (lambda i, p, o: (i, p, torch.cat([o[:1], o[1:-1].flip(0), o[-1:]])), "non-decreasing"),
    "id_too_large": (lambda i, p, o: (i.index_fill(1, torch.tensor([0]), 10**6), p, o), "not an expert id"),
    "id_negative": (lambda i, p, o: (i.index_fill(1, torch.tensor([0]), -1), p, o), "not an expert id"),
    "pair_too_large": (lambda i, p, o: (i, p.index_fill(0, torch.tensor([0]), p.numel()), o), "not a pair index"),
    "pair_negative": (lambda i, p, o: (i, p.index_fill(0, torch.tensor([0]), -5), o), "not a pair index"),
    "pair_twice": (lambda i, p, o: (i, p.index_fill(0, torch.tensor([1]), int(p[0])), o), "twice"),
    "pairs_not_grouped": (lambda i, p, o: (i, p.roll(1), o), "segment"),
}


@pytest.mark.skipif(not dispatch.available("experts_swiglu", "native", "cpu"), reason="needs foe_compile._C")
@pytest.mark.parametrize("spoil", BAD_INDICES)
def test_native_cpu_experts_refuse_bad_routing_indices(spoil):
    E, H = 6, 2
    args = list(experts_args(dict(T=5, E=E, k=2, H=H, d=8, inter=4, dtype=torch.float32, poison="none", rows=[0],
                                  seed=1)))
    ids = torch.tensor([[0, 3], [1, 4], [2, 5], [0, 4], [1, 5]])  # offsets [0, 2, 4, 5, 7, 9, 10]: none repeated
    pairs, offsets = reference.group_by_expert(ids, E)
    run("experts_swiglu", "native", *args[:3], ids, args[4], pairs, offsets, H)  # the genuine ones pass
    fn, message = BAD_INDICES[spoil]
    args[3], args[5], args[6] = fn(ids, pairs, offsets)
    with pytest.raises(RuntimeError, match=message):
        run("experts_swiglu", "native", *args)


# ---- end to end: a converted Hugging Face model given NaN ----------------------------------------------

E2E = textwrap.dedent("""
    import copy, json, sys, torch, foe_compile
    for case in sys.argv[1:]:
        torch.manual_seed(0)
        source = foe_compile.builtin_model("olmoe-tiny")
        if case == "nan_router_weight":  # corrupted weights in one layer's router
            with torch.no_grad():
                source.model.layers[1].mlp.gate.weight[3, 5] = float("nan")
        converted, _ = foe_compile.convert(copy.deepcopy(source), mode="exact")
        embeds = torch.randn(2, 7, source.config.hidden_size)
        if case == "nan_embeds":  # NaN in one token of the first sequence; the second stays finite
            embeds[0, 4, :3] = float("nan")
        with torch.no_grad():
            want = source(inputs_embeds=embeds)[0]
            got = converted(inputs_embeds=embeds)[0]
        finite = ~want.isnan()
        print(json.dumps(dict(case=case, nan_rows_source=want.isnan().any(-1).tolist(),
                              nan_rows_converted=got.isnan().any(-1).tolist(),
                              same_nan=torch.equal(want.isnan(), got.isnan()),
                              max_err=(got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0)),
              flush=True)
""")
E2E_CASES = ["nan_embeds", "nan_router_weight"]


@pytest.fixture(scope="module")
def e2e_results() -> dict:
    """Both cases in one subprocess (a crash must not kill pytest; one interpreter start, not two)."""
    env = dict(os.environ, FOE_KERNELS="native")
    out = subprocess.run([sys.executable, "-c", E2E, *E2E_CASES], capture_output=True, text=True, env=env, timeout=600)
    results = {r["case"]: r for r in map(json.loads, filter(None, out.stdout.splitlines()))}
    return dict(results, returncode=out.returncode, stderr=out.stderr[-3000:])


@pytest.mark.skipif(not dispatch.available("sum_route_dispatch", "native", "cpu"), reason="needs foe_compile._C")
@pytest.mark.parametrize("case", E2E_CASES)
def test_converted_model_with_nan_does_not_crash(e2e_results, case):
    """olmoe-tiny converted in exact mode: before the fix the C++ route kernel wrote at index -1 ("double free or
    corruption"). The converted model's NaN logits are exactly the unconverted model's; the rest agrees."""
    assert e2e_results["returncode"] == 0 and case in e2e_results, \
        f"converted model crashed (rc={e2e_results['returncode']}): {e2e_results['stderr']}"
    result = e2e_results[case]
    assert result["same_nan"], result
    assert result["nan_rows_source"] == result["nan_rows_converted"]
    if case == "nan_embeds":
        assert any(result["nan_rows_source"][0]) and not any(result["nan_rows_source"][1])  # the pattern is real
    else:
        assert all(all(row) for row in result["nan_rows_source"])
    assert result["max_err"] <= 1e-4
