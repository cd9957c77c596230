"""Property-based fuzzing of the op boundary (hypothesis): foe::sum_route_dispatch and foe::experts_swiglu on
every implementation present on this machine, against the plain-PyTorch reference (reference.py).

Drawn: T in {0, 1, primes, one past the C++ kernel's 64-token chunk}, fp32/bf16/fp16, E = 1 ... 40 with
H in {1, 2, 3, 4} dividing E and k (k = E included), d down to 1 (d = 1 and a zero router give exact ties),
renormalize on/off, residual [1 or H, T, d], the experts' routing weight on their output or input
(weight_input), and poison: NaN / +-Inf / huge values in a few tokens, a NaN router row, or tie-making routers. The NaN contract (csrc/route_dispatch_cpu.cpp, kernels/route_dispatch.cuh):
ids stay in [0, E) and distinct per group; a poisoned row's outputs are NaN exactly where the reference's are;
other rows are unaffected. On CPU the C++ ids equal the reference's torch.topk ids exactly, ties and NaN
rows included. Implementations: the C++ kernels (always here), Triton's interpreter for the experts (tiny
example count), and on a CUDA machine the native CUDA and CuPy kernels (marked gpu).

This file: the route op, and the strategies, tolerances and settings shared with test_experts_fuzz.py (the
experts op, route then experts, bad routing indices, a converted model given NaN).

Examples are derandomized (the same cases every CI run, ~30 s on 2 cores). For a longer, random hunt:
FOE_FUZZ_SCALE=20 FOE_FUZZ_RANDOM=1 pytest tests/foe/test_op_fuzz.py tests/foe/test_experts_fuzz.py
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the [test] extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from foe_compile.kernels import dispatch, reference  # noqa: E402

# ---- what runs here ------------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def implementations(op: str) -> list:
    """(backend, device) pairs of `op` present on this machine, each a pytest param (CUDA ones marked gpu)."""
    found = []
    for device in DEVICES:
        for backend in ("native", "cupy", "triton"):
            if dispatch.available(op, backend, device):
                marks = [pytest.mark.gpu] if device == "cuda" else []
                found.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return found or [pytest.param(None, None, marks=pytest.mark.skip(reason=f"no compiled kernel of foe::{op} here "
                                                                               "(build the extension)"))]


def run(op: str, backend: str, *args):
    """The public op, through its dispatcher entry, with `backend` selected (as FOE_KERNELS=<backend> does)."""
    with dispatch.use_backend(backend):
        return getattr(torch.ops.foe, op)(*args)


SCALE = float(os.environ.get("FOE_FUZZ_SCALE", "1"))
RANDOM = bool(os.environ.get("FOE_FUZZ_RANDOM"))


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=not RANDOM,
                    database=None, print_blob=RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- tolerances (STYLE rule 8) -------------------------------------------------------------------------

# (rtol, atol) for r, xn and topk_weights; ids, sorted_pairs, expert_offsets compare exactly.
ROUTE_TOL = {
    torch.float32: (1e-5, 1e-5),
    # r/xn round where the reference rounds; RMSNorm's sum-of-squares order can move xn by an ulp (bf16 2^-7 at 1,
    # fp16 2^-10), which moves logits and so the weights by about as much.
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
# (rtol, atol) for experts_swiglu's output [G, T, d] (inputs of unit scale, weights scaled by 1/sqrt(fan-in)).
EXPERTS_TOL = {
    torch.float32: (1e-5, 2e-5),  # GEMM summation order only
    # The reference rounds gate/up, silu*up, the weighted row and every index_add_ to the dtype; Triton keeps
    # fp32 until h and y, the C++ kernel follows the reference's ops: a few ulps apart.
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (3e-3, 3e-3),
}
# Largest reference-logit gap between two experts that an implementation may swap when its xn differs from
# the reference's by an ulp (bf16/fp16 RMSNorm order): two ulps of a logit below 4. fp32 xn agrees bit for bit.
LOGIT_ATOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-5, torch.float16: 2.0**-8}
# Softmax rounding: distinct logits whose fp32 probabilities are this close (relative) may order either way.
PROB_RTOL = 4 * torch.finfo(torch.float32).eps
HUGE = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 6e4}  # near the dtype's max: sums overflow

# ---- strategies ----------------------------------------------------------------------------------------

TOKENS = [0, 1, 2, 3, 7, 19, 65]  # 0, 1, primes, one past the C++ kernel's 64-token chunk
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POISONS = ["none", "nan", "inf", "-inf", "huge", "nan_router_row", "zero_router", "coarse_router"]


@st.composite
def routings(draw):
    """(E, k, H): H in {1, 2, 3, 4} divides E and k (3: the mean over groups is not exact); k = E, E = 1 included."""
    H = draw(st.sampled_from([1, 2, 3, 4]))
    block = draw(st.sampled_from([1, 2, 3, 5, 8, 10]))
    per_group = draw(st.integers(1, block))
    return H * block, H * per_group, H


@st.composite
def route_cases(draw):
    E, k, H = draw(routings())
    return dict(T=draw(st.sampled_from(TOKENS)), E=E, k=k, H=H, d=draw(st.sampled_from([1, 2, 5, 16, 24])),
                dtype=draw(st.sampled_from(DTYPES)), renormalize=draw(st.booleans()),
                residual_groups=draw(st.sampled_from([1, H])), poison=draw(st.sampled_from(POISONS)),
                rows=draw(st.lists(st.integers(0, 64), min_size=1, max_size=3)),
                eps=draw(st.sampled_from([1e-6, 1e-5])), seed=draw(st.integers(0, 2**16)))


def route_args(c: dict, device: str = "cpu"):
    """Arguments of foe::sum_route_dispatch for case `c`, poisoned as it says."""
    g = torch.Generator().manual_seed(c["seed"])
    T, E, H, d, dtype = c["T"], c["E"], c["H"], c["d"], c["dtype"]
    residual = torch.randn(c["residual_groups"], T, d, generator=g)
    partials = torch.randn(H, T, d, generator=g)
    norm_weight = 1 + 0.1 * torch.randn(d, generator=g)
    router = torch.randn(E, d, generator=g) / d ** 0.5
    poison, rows = c["poison"], sorted({r % T for r in c["rows"]}) if T else []
    if poison in ("nan", "inf", "-inf", "huge"):
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": HUGE[dtype]}[poison]
        for i, t in enumerate(rows):  # alternate between a partial and the residual, one element or the row
            target = partials[i % H] if i % 2 == 0 else residual[i % residual.shape[0]]
            if i % 3 == 2:
                target[t] = value
            else:
                target[t, (t + i) % d] = value
    elif poison == "nan_router_row":  # corrupted weights: every token's probabilities are NaN
        router[c["seed"] % E] = float("nan")
    elif poison == "zero_router":     # every probability 1/E: pure ties
        router.zero_()
    elif poison == "coarse_router":   # few distinct logits: many exact ties
        router = (router * 2).round() / 2
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(residual), to(partials), to(norm_weight), c["eps"], to(router), H, c["k"], c["renormalize"]


# ---- checks --------------------------------------------------------------------------------------------

def check_structure(ids, pairs, offsets, E: int, k: int, H: int) -> None:
    """What keeps every consumer in bounds: int64 ids in their group's block, distinct per row, and
    pairs/offsets exactly the stable grouping of those ids."""
    assert ids.dtype == pairs.dtype == offsets.dtype == torch.int64
    T, block = ids.shape[0], E // H
    group_of_slot = torch.arange(k, device=ids.device) // (k // H)
    assert bool(((ids // block) == group_of_slot).all()), f"ids outside their group's block: {ids.tolist()}"
    if T:
        assert bool((ids.sort(dim=1).values.diff(dim=1) > 0).all()), "an expert picked twice in one row"
    want_pairs, want_offsets = reference.group_by_expert(ids, E)
    assert torch.equal(pairs, want_pairs) and torch.equal(offsets, want_offsets)


def check_ids(got_ids, got_xn, want, args, exact_ties: bool) -> None:
    """got_ids equal the reference's ids, except swaps the rounding explains:
    - rows whose xn equals the reference's bit for bit: only between experts with distinct logits whose fp32
      probabilities are within PROB_RTOL (softmax summation order); exact ties and NaN rows resolve exactly as
      torch.topk does when `exact_ties` (CPU); on CUDA the kernels take the lower id on ties (documented), so
      there any tie, and any order inside a NaN row, is accepted;
    - rows whose xn differs by the low-precision ulp: logits within LOGIT_ATOL."""
    want_ids = want[2]
    differ = (got_ids != want_ids).any(dim=1)
    if not differ.any():
        return
    logits = F.linear(want[1], args[4]).float()
    probs = torch.softmax(logits, dim=-1)
    same_xn = ((got_xn == want[1]) | (got_xn.isnan() & want[1].isnan())).all(dim=1)
    for t in differ.nonzero().flatten().tolist():
        nan_row = bool(probs[t].isnan().all())
        assert not (nan_row and exact_ties), f"row {t}: NaN row picks {got_ids[t].tolist()} != {want_ids[t].tolist()}"
        if nan_row:
            continue
        a, b = got_ids[t], want_ids[t]
        la, lb, pa, pb = logits[t, a], logits[t, b], probs[t, a], probs[t, b]
        if bool(same_xn[t]):
            tied = la == lb
            assert not (exact_ties and bool((tied & (a != b)).any())), \
                f"row {t}: exact tie resolved unlike torch.topk: {a.tolist()} vs {b.tolist()}"
            gap = (pa - pb).abs()
            assert bool((tied | (gap <= PROB_RTOL * torch.maximum(pa, pb))).all()), \
                f"row {t}: picks {a.tolist()} vs {b.tolist()} are not a near-tie (probability gap {gap.max()})"
        else:
            gap = (la - lb).abs().max().item()
            assert gap <= LOGIT_ATOL[args[1].dtype], f"row {t}: picks differ beyond a tie: logit gap {gap}"


def check_route(got, args, exact_ties: bool) -> None:
    want = reference.sum_route_dispatch(*args)
    r, xn, ids, weights, pairs, offsets = got
    E, k, H = args[4].shape[0], args[6], args[5]
    check_structure(ids, pairs, offsets, E, k, H)
    rtol, atol = ROUTE_TOL[args[1].dtype]
    # equal_nan: NaN exactly where the reference has NaN (and Inf where it has Inf), close elsewhere.
    torch.testing.assert_close(r, want[0], rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(xn, want[1], rtol=rtol, atol=atol, equal_nan=True)
    check_ids(ids, xn, want, args, exact_ties)
    if torch.equal(ids, want[2]):
        torch.testing.assert_close(weights, want[3], rtol=rtol, atol=atol, equal_nan=True)
        assert torch.equal(pairs, want[4]) and torch.equal(offsets, want[5])
    else:  # swapped near-ties: the NaN pattern still matches, values are close
        assert torch.equal(weights.isnan(), want[3].isnan())
        torch.testing.assert_close(weights.sort(-1).values, want[3].sort(-1).values, rtol=rtol, atol=max(atol, 1e-3),
                                   equal_nan=True)


# ---- sum_route_dispatch --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", implementations("sum_route_dispatch"))
@fuzz_settings(150)
@given(c=route_cases())
def test_route_matches_reference(backend, device, c):
    args = route_args(c, device)
    check_route(run("sum_route_dispatch", backend, *args), args, exact_ties=device == "cpu")


@pytest.mark.parametrize("backend,device", implementations("sum_route_dispatch"))
@fuzz_settings(40)
@given(c=route_cases(), bad=st.integers(0, 64))
def test_route_nan_row_leaves_other_rows_alone(backend, device, c, bad):
    """A NaN in one token changes nothing in any other token's outputs (bit for bit)."""
    c = dict(c, T=max(c["T"], 2), poison="none")
    clean = route_args(c, device)
    poisoned = list(clean)
    t = bad % c["T"]
    poisoned[1] = clean[1].clone()
    poisoned[1][0, t, 0] = float("nan")
    got_clean = run("sum_route_dispatch", backend, *clean)
    got = run("sum_route_dispatch", backend, *poisoned)
    check_route(got, tuple(poisoned), exact_ties=device == "cpu")
    rest = torch.arange(c["T"], device=device) != t
    for name, a, b in zip(("r", "xn"), got[:2], got_clean[:2]):
        assert torch.equal(a[rest], b[rest]), f"{name}: a NaN in token {t} changed other tokens"
    # NOTE: the router GEMM is the reference's own F.linear call, and ATen's bf16 GEMM on CPU (torch 2.13,
    # AVX-512, odd d, T >= 64) reads one element past each row: a NaN at the start of row t makes row t-1's
    # logits NaN too. Rows whose reference logits changed are exempt; every other row must be untouched.
    logits_clean, logits = (F.linear(x, clean[4]) for x in (got_clean[1], got[1]))
    leaked = ((logits_clean != logits) & ~(logits_clean.isnan() & logits.isnan())).any(dim=1)
    keep = rest & ~leaked
    for name, a, b in zip(("ids", "weights"), got[2:4], got_clean[2:4]):
        assert torch.equal(a[keep], b[keep]), f"{name}: a NaN in token {t} changed other tokens"
    assert bool(got[3][t].isnan().all()) and bool(got[1][t].isnan().all())


@st.composite
def route_variants(draw, E: int, dtype: torch.dtype):
    """The router-variant arguments (ops.ROUTE_SCHEMA) for E experts and H = 1: any scoring, correction bias,
    group limit (groups of >= 2, -inf or 0 fill), renormalisation eps / min, per-expert scale, topk_first."""
    scoring = draw(st.sampled_from(reference.SCORINGS))
    topk_first = draw(st.booleans())
    groups = [n for n in range(2, E // 2 + 1) if E % n == 0]
    n_group = 1 if topk_first or not groups else draw(st.sampled_from([1] + groups))
    g = torch.Generator().manual_seed(E)
    correction = None if topk_first or not draw(st.booleans()) else (0.2 * torch.randn(E, generator=g)).to(dtype)
    scale = (torch.rand(E, generator=g) + 0.5).to(dtype) if draw(st.booleans()) else None
    return (scoring, None, correction, draw(st.sampled_from([1.0, 2.5])), n_group,
            draw(st.integers(1, n_group)), draw(st.booleans()), scale, draw(st.sampled_from([0.0, 1e-20, 1e-6])),
            draw(st.sampled_from([0.0, 1e-12])), topk_first)


@pytest.mark.parametrize("backend,device", [p for p in implementations("sum_route_dispatch") if p.values[1] == "cpu"])
@fuzz_settings(150)
@given(c=route_cases(), data=st.data())
def test_route_variants_match_reference(backend, device, c, data):
    """The group-limit and weight variants (H = 1, as the group limit needs): structure always; where the kernel's
    xn row equals the reference's bit for bit, the same ids (the selection is the reference's own ATen calls, or
    the softmax whose near-ties check_ids allows) and close weights; NaN weights exactly where the reference's."""
    c = dict(c, H=1, k=min(c["k"], c["E"]), residual_groups=1)
    args = route_args(c, device)
    var = data.draw(route_variants(c["E"], c["dtype"]))
    got = run("sum_route_dispatch", backend, *args, *var)
    want = reference.sum_route_dispatch(*args, *var)
    check_structure(got[2], got[4], got[5], c["E"], c["k"], 1)
    rtol, atol = ROUTE_TOL[c["dtype"]]
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol, equal_nan=True)
    same_xn = ((got[1] == want[1]) | (got[1].isnan() & want[1].isnan())).all(dim=1)
    aten_selected = var[0] != "softmax" or var[2] is not None or var[4] > 1 or var[10]
    rows = same_xn & (got[2] == want[2]).all(dim=1) if not aten_selected else same_xn
    assert torch.equal(got[2][rows], want[2][rows])
    torch.testing.assert_close(got[3][rows], want[3][rows], rtol=rtol, atol=atol, equal_nan=True)
