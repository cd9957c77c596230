"""Metrics on hand-computed cases (see tests/placement/tiny_circuit.py) and against references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import placement_compile.metrics as metrics
from placement_compile.bookshelf import read_bookshelf
from placement_compile.graph import PlacementGraph
from placement_compile.macro_view import macro_view
from placement_compile.metrics import (
    circuit_macro_legality,
    hpwl_full,
    hpwl_macro_only,
    hpwl_normalised,
    legality_score,
    legality_score_boxes,
    overlap_area,
    overlap_area_boxes,
)
from placement_compile.to_graph import circuit_to_graph
from tests.placement.tiny_circuit import FULL_HPWL, MACRO_HPWL, VIEW_NORMALISED_HPWL, write_tiny

# fp32 graph tensors: values here are O(1-10), so 1e-6 relative is many ulps of headroom.
TOL32 = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture
def tiny(tmp_path):
    return read_bookshelf(write_tiny(tmp_path))


def test_bookshelf_hpwl_hand_values(tiny):
    assert hpwl_full(tiny) == FULL_HPWL
    assert hpwl_macro_only(tiny) == MACRO_HPWL
    moved = tiny.positions + [[0, 0], [1, 0], [0, 0], [0, 0]]  # B one unit right
    assert hpwl_full(tiny, moved) == 11.5 + 5.5 + 15 + 2
    assert hpwl_macro_only(tiny, moved) == 11 + 2
    with pytest.raises(ValueError, match=r"\[4, 2\]"):
        hpwl_full(tiny, moved[:3])


def test_normalised_hpwl_hand_value_and_batch(tiny):
    g = circuit_to_graph(macro_view(tiny))
    torch.testing.assert_close(hpwl_normalised(g, g.positions), torch.tensor(VIEW_NORMALISED_HPWL), **TOL32)
    pos = torch.randn(5, g.num_nodes, 2)
    ref = []
    for b in range(5):  # plain reference: loop over nets
        pins = pos[b, g.pin_node] + g.pin_offset
        ref.append(sum((pins[g.pin_net == n].amax(0) - pins[g.pin_net == n].amin(0)).sum() for n in range(g.num_nets)))
    torch.testing.assert_close(hpwl_normalised(g, pos), torch.stack(ref), **TOL32)
    with pytest.raises(ValueError, match="positions must be"):
        hpwl_normalised(g, pos[:, :2])


def test_normalised_hpwl_gradient():
    # One 2-pin net between nodes 0 (left) and 1 (right, higher): d/dx0 = -1, d/dx1 = +1, etc.
    g = PlacementGraph(
        sizes=torch.ones(3, 2) * 0.1, positions=torch.zeros(3, 2), is_port=torch.zeros(3, dtype=torch.bool),
        edge_index=torch.zeros(2, 0, dtype=torch.long), edge_attr=torch.zeros(0, 4),
        pin_node=torch.tensor([0, 1]), pin_offset=torch.zeros(2, 2), pin_net=torch.tensor([0, 0]), num_nets=1,
    )  # fmt: skip
    pos = torch.tensor([[[0.0, 0.0], [0.5, 0.25], [0.9, 0.9]]], requires_grad=True)
    out = hpwl_normalised(g, pos)
    out.sum().backward()
    torch.testing.assert_close(out, torch.tensor([0.75]))
    torch.testing.assert_close(pos.grad, torch.tensor([[[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]]))


def test_legality_boxes_exact():
    assert legality_score_boxes(np.array([[0, 0], [2, 0]]), np.ones((2, 2)), (0, 0, 4, 4)) == 1.0
    # Half overlap: union 1.5, sum 2.
    assert legality_score_boxes(np.array([[0, 0], [0.5, 0]]), np.ones((2, 2)), (0, 0, 4, 4)) == 0.75
    # Half outside the canvas: 0.5 / 1.
    assert legality_score_boxes(np.array([[-0.5, 0]]), np.ones((1, 2)), (0, 0, 4, 4)) == 0.5
    assert legality_score_boxes(np.zeros((0, 2)), np.zeros((0, 2)), (0, 0, 4, 4)) == 1.0


def test_legality_on_circuit_and_graph(tiny):
    assert circuit_macro_legality(tiny) == 1.0
    g = circuit_to_graph(macro_view(tiny))  # nodes A, B, P
    assert legality_score(g) == pytest.approx(1.0, abs=1e-6)  # fp32 graph sizes
    # B (2x3) at lower-left (1, 1) overlaps A (2x2 at the origin) by 1: union 9 / sum 10.
    overlapping = tiny.positions + [[0, 0], [-4, -4], [0, 0], [0, 0]]
    assert circuit_macro_legality(tiny, overlapping) == pytest.approx(0.9, abs=1e-12)
    pos = g.from_source_units(torch.tensor([[1.0, 1.0], [2.0, 2.5], [9.5, 9.5]], dtype=torch.float64))
    assert legality_score(g, pos) == pytest.approx(0.9, abs=1e-6)
    # A half outside (lower-left (-1, 0)): inside 2 + 6 of 10.
    pos = g.from_source_units(torch.tensor([[0.0, 1.0], [6.0, 6.5], [9.5, 9.5]], dtype=torch.float64))
    assert legality_score(g, pos) == pytest.approx(0.8, abs=1e-6)
    # The pad is a port: putting it on top of B changes nothing.
    pos = g.from_source_units(torch.tensor([[1.0, 1.0], [6.0, 6.5], [6.0, 6.5]], dtype=torch.float64))
    assert legality_score(g, pos) == pytest.approx(1.0, abs=1e-6)
    assert float(overlap_area(g, pos)) == 0.0


def test_overlap_hand_value_and_batch():
    sizes = torch.tensor([[2.0, 2.0], [2.0, 3.0], [1.0, 1.0]])
    # A [0,2]^2, B [1,3]x[1,4], C [1.5,2.5]x[0,1]: A∩B = 1, A∩C = 0.5, B∩C = 0 (touching).
    centres = torch.tensor([[1.0, 1.0], [2.0, 2.5], [2.0, 0.5]])
    apart = centres + torch.tensor([[0.0, 0.0], [5.0, 0.0], [10.0, 0.0]])
    out = overlap_area_boxes(torch.stack([centres, apart]), sizes)
    torch.testing.assert_close(out, torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize("v", [0, 1, 19])
def test_overlap_chunked_equals_naive(monkeypatch, v):
    monkeypatch.setattr(metrics, "_OVERLAP_ROWS", 7)  # 19 = two full chunks + one partial
    gen = torch.Generator().manual_seed(v)
    centres, sizes = torch.rand(3, v, 2, generator=gen, dtype=torch.float64), torch.rand(v, 2, generator=gen) * 0.5
    sizes = sizes.double()
    ref = torch.zeros(3, dtype=torch.float64)
    for i in range(v):
        for j in range(i + 1, v):
            lo = torch.maximum(centres[:, i] - sizes[i] / 2, centres[:, j] - sizes[j] / 2)
            hi = torch.minimum(centres[:, i] + sizes[i] / 2, centres[:, j] + sizes[j] / 2)
            ref += (hi - lo).clamp_min(0).prod(-1)
    torch.testing.assert_close(overlap_area_boxes(centres, sizes), ref, rtol=1e-12, atol=1e-12)
