"""The foe:: op contract: opcheck, and the fused reference equals the unfused sequence of ops."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from foe_compile.kernels import reference, use_backend

CASES = [  # (T, E, k, H): odd T, E not a power of two, k/H = 1 and > 1
    (1, 6, 2, 2), (7, 12, 4, 2), (111, 12, 4, 4), (7, 60, 4, 1), (0, 8, 2, 2),
]


def inputs(T, E, k, H, d=16, inner=8, seed=0, residual_groups=None):
    g = torch.Generator().manual_seed(seed)
    R = H if residual_groups is None else residual_groups
    return dict(
        residual=torch.randn(R, T, d, generator=g), partials=torch.randn(H, T, d, generator=g),
        norm_weight=torch.randn(d, generator=g), router_weight=torch.randn(E, d, generator=g),
        gate_up=torch.randn(E, 2 * inner, d, generator=g) / 4, down=torch.randn(E, d, inner, generator=g) / 4,
    )


def unfused(a, H, k, renormalize, eps=1e-6):
    """The same computation as separate ops, written without the reference helpers."""
    r = (a["residual"] + a["partials"]).mean(0)
    xn = a["norm_weight"] * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps))
    probs = F.softmax(xn @ a["router_weight"].T, dim=-1)
    E = probs.shape[1]
    blocks = probs.view(-1, H, E // H)
    vals, local = blocks.topk(k // H, dim=-1)
    ids = (local + torch.arange(H).view(1, H, 1) * (E // H)).reshape(-1, k)
    w = vals.reshape(-1, k)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros(H, *xn.shape)
    for t in range(xn.shape[0]):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (a["gate_up"][e] @ xn[t]).chunk(2)
            out[e // (E // H), t] += w[t, j] * (a["down"][e] @ (F.silu(gate) * up))
    return r, xn, ids, w, out


@pytest.mark.parametrize("T, E, k, H", CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_reference_equals_unfused_ops(T, E, k, H, renormalize):
    a = inputs(T, E, k, H)
    with use_backend("reference"):
        r, xn, ids, w, pairs, offsets = torch.ops.foe.sum_route_dispatch(
            a["residual"], a["partials"], a["norm_weight"], 1e-6, a["router_weight"], H, k, renormalize)
        out = torch.ops.foe.experts_swiglu(xn, a["gate_up"], a["down"], ids, w, pairs, offsets, H)
    r2, xn2, ids2, w2, out2 = unfused(a, H, k, renormalize)
    torch.testing.assert_close(r, r2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xn, xn2, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(w, w2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    # Token grouping: exactly the stable order of the (token, slot) pairs by expert.
    flat = ids.flatten()
    expected = sorted(range(flat.numel()), key=lambda p: (int(flat[p]), p))
    assert pairs.tolist() == expected
    assert offsets.tolist() == [0] + torch.bincount(flat, minlength=E).cumsum(0).tolist()


def test_residual_broadcast_and_global_routing():
    a = inputs(9, 12, 4, 4, residual_groups=1)
    with use_backend("reference"):
        r, _, ids, *_ = torch.ops.foe.sum_route_dispatch(a["residual"], a["partials"], a["norm_weight"], 1e-6,
                                                         a["router_weight"], 1, 4, True)
    torch.testing.assert_close(r, a["residual"][0] + a["partials"].mean(0))
    probs = F.softmax(reference.rms_norm(r, a["norm_weight"], 1e-6) @ a["router_weight"].T, -1)
    assert torch.equal(ids, probs.topk(4, -1).indices)


@pytest.mark.parametrize("T", [0, 7])
def test_opcheck(T):
    a = inputs(T, 6, 2, 2)
    grads = {n: t.requires_grad_() for n, t in a.items()}
    route_args = (grads["residual"], grads["partials"], grads["norm_weight"], 1e-6, grads["router_weight"], 2, 2, True)
    with use_backend("reference"):
        opcheck(torch.ops.foe.sum_route_dispatch.default, route_args)
        _, xn, ids, w, pairs, offsets = torch.ops.foe.sum_route_dispatch(*route_args)
        opcheck(torch.ops.foe.experts_swiglu.default,
                (xn.detach().requires_grad_(), grads["gate_up"], grads["down"], ids, w.detach().requires_grad_(),
                 pairs, offsets, 2))


def test_gradients_match_unfused_autograd():
    a = inputs(5, 6, 2, 2)
    leaves = {n: t.clone().requires_grad_() for n, t in a.items()}
    with use_backend("reference"):
        r, xn, ids, w, pairs, offsets = torch.ops.foe.sum_route_dispatch(
            leaves["residual"], leaves["partials"], leaves["norm_weight"], 1e-6, leaves["router_weight"], 2, 2, True)
        out = torch.ops.foe.experts_swiglu(xn, leaves["gate_up"], leaves["down"], ids, w, pairs, offsets, 2)
    (out.square().sum() + r.sum()).backward()
    ref = {n: t.clone().requires_grad_() for n, t in a.items()}
    r2, _, _, _, out2 = unfused(ref, 2, 2, True)
    (out2.square().sum() + r2.sum()).backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_shapes_are_rejected():
    a = inputs(4, 6, 2, 2)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        torch.ops.foe.sum_route_dispatch(a["residual"], a["partials"], a["norm_weight"], 1e-6, a["router_weight"],
                                         4, 2, True)
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.foe.sum_route_dispatch(a["residual"][:, :3], a["partials"], a["norm_weight"], 1e-6,
                                         a["router_weight"], 2, 2, True)


def test_auto_dispatch_rule():
    from foe_compile.kernels.dispatch import preference

    assert preference("sum_route_dispatch", "cpu") == ("native",)
    assert preference("sum_route_dispatch", "cuda", 1, 128)[0] == "native"
    # Experts: Triton except eager single-token decode with many experts (measured, see NOTE).
    assert preference("experts_swiglu", "cuda", 1, 128)[0] == "native"
    assert preference("experts_swiglu", "cuda", 1, 128, capturing=True)[0] == "triton"
    assert preference("experts_swiglu", "cuda", 8, 128)[0] == "triton"
    assert preference("experts_swiglu", "cuda", 1, 8)[0] == "triton"
