import math

import torch

from placement_compile.guidance import (Guidance, GuidanceConfig, boundary_potential, legality_potential,
                                        pair_potential, pair_potential_reference, softmax_factor)
from tests.placement.helpers import tiny_graph


def test_two_object_potential_by_hand():
    # Equal squares 0.2 wide, centres 0.1 apart in x: delta = (-0.1, -0.2).
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0]]], dtype=torch.float64)
    sizes = torch.full((2, 2), 0.2, dtype=torch.float64)
    kappa = 10.0
    px = math.exp(-1) / (math.exp(-1) + math.exp(-2))
    gap = -0.1 * px - 0.2 * (1 - px)
    # two ordered pairs, each weighted m_j / (m_i + m_j) = 1/2
    expected = 2 * 0.5 * gap**2 / 4
    assert math.isclose(pair_potential(x, sizes, kappa).item(), expected, rel_tol=1e-12)
    assert math.isclose(pair_potential_reference(x, sizes, kappa).item(), expected, rel_tol=1e-12)
    # boundary: an object reaching 0.05 past x = 1 -> 0.05^2 / 2
    edge = torch.tensor([[[0.95, 0.0]]], dtype=torch.float64)
    assert math.isclose(boundary_potential(edge, sizes[:1]).item(), 0.05**2 / 2, rel_tol=1e-12)
    # separated objects: no pair penalty
    far = torch.tensor([[[0.0, 0.0], [0.5, 0.0]]], dtype=torch.float64)
    assert pair_potential(far, sizes, kappa).item() == 0.0


def test_heavier_object_moves_less():
    x = torch.tensor([[[0.0, 0.0], [0.2, 0.05]]], dtype=torch.float64, requires_grad=True)
    sizes = torch.tensor([[0.4, 0.4], [0.1, 0.1]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(pair_potential(x, sizes, 10.0).sum(), x)
    assert grad[0, 1].norm() > 3 * grad[0, 0].norm() > 0


def test_fused_matches_reference_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 37, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    sizes = torch.rand(37, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.02
    for kappa in (5.0, 20.0, 50.0):
        ref = pair_potential_reference(x, sizes, kappa)
        got = pair_potential(x, sizes, kappa)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        (g_got,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


def test_softmax_factor_schedule():
    assert softmax_factor(1.0) == 10.0
    assert softmax_factor(0.55) == 15.0
    assert softmax_factor(0.1) == 20.0 and softmax_factor(0.0) == 20.0


def test_ports_get_no_gradient_and_dual_ascent_only_late():
    graph = tiny_graph(num_macros=4, num_ports=3)
    graph.positions[:4] = torch.tensor([[0.0, 0.0], [0.05, 0.0], [0.0, 0.05], [0.9, 0.9]])
    x = graph.positions.expand(2, -1, -1).clone()
    x[:, graph.is_port] = 0.0  # ports sit on top of the macros: they must still not move
    guide = Guidance(graph, batch=2, cfg=GuidanceConfig(steps=5, alpha_init=1.0))
    early = guide.refine(x, t=0.8)
    torch.testing.assert_close(early[:, graph.is_port], x[:, graph.is_port], rtol=0, atol=0)
    assert not torch.equal(early[:, ~graph.is_port], x[:, ~graph.is_port])
    assert guide.alpha.tolist() == [1.0, 1.0]  # no dual ascent for t >= 0.5
    guide.refine(x, t=0.3)
    assert all(a > 1.0 for a in guide.alpha.tolist())  # overlapping: alpha grows
    legal, wire = guide.potentials(x, 10.0)
    assert legal.shape == wire.shape == (2,)
    assert bool((legality_potential(x, graph.sizes, ~graph.is_port, 10.0) > 0).all())


def test_chunked_pairs_match_one_chunk(monkeypatch):
    import placement_compile.guidance as guidance
    from placement_compile.legalizer import hard_violation

    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(3, 37, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    sizes = torch.rand(37, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.02
    movable = torch.ones(37, dtype=torch.bool)
    whole = pair_potential(x, sizes, 10.0)
    (g_whole,) = torch.autograd.grad(whole.sum(), x)
    depth = hard_violation(x.detach(), sizes, movable)
    monkeypatch.setattr(guidance, "PAIR_CHUNK_ELEMENTS", 3 * 37 * 5)  # 5 rows: chunks of 5, last of 2
    assert guidance.pair_rows(3, 37) == 5
    chunked = pair_potential(x, sizes, 10.0)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), x)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hard_violation(x.detach(), sizes, movable), depth, rtol=0, atol=0)
