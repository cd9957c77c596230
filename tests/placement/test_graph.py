"""Macro-only view and the circuit <-> normalised PlacementGraph conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from placement_compile.bookshelf import read_bookshelf
from placement_compile.macro_view import lift_positions, macro_view
from placement_compile.metrics import hpwl_full, hpwl_macro_only, hpwl_normalised, legality_score, overlap_area
from placement_compile.to_graph import circuit_to_graph, driver_pins, graph_to_lower_left
from tests.placement.test_bookshelf import IBM, ibm
from tests.placement.tiny_circuit import FILES, write_tiny


@pytest.fixture
def tiny(tmp_path):
    return read_bookshelf(write_tiny(tmp_path))


def test_tiny_macro_view(tiny):
    v = macro_view(tiny)
    assert v.node_names == ["A", "B", "P"] and v.source_index.tolist() == [0, 1, 3]
    assert v.net_names == ["n0", "n1", "n3"]  # n2 keeps only the pad: dropped
    assert v.pin_node.tolist() == [0, 1, 1, 2, 0, 0] and v.pin_net.tolist() == [0, 0, 1, 1, 2, 2]
    assert v.num_macros == 2 and hpwl_full(v) == 18.5 and hpwl_macro_only(v) == hpwl_macro_only(tiny)


def test_tiny_graph_exact(tiny):
    g = circuit_to_graph(macro_view(tiny))
    torch.testing.assert_close(g.sizes, torch.tensor([[0.4, 0.4], [0.4, 0.6], [0.2, 0.2]]))
    torch.testing.assert_close(g.positions, torch.tensor([[-0.8, -0.8], [0.2, 0.3], [0.9, 0.9]]))
    assert g.is_port.tolist() == [False, False, True]
    # Stars: n0 A(O) -> B, n1 B(O) -> P; n3's two pins share node A: no edge. Then reverses.
    assert g.edge_index.tolist() == [[0, 1, 1, 2], [1, 2, 0, 1]]
    attr = [[0.2, 0.0, -0.2, 0.3], [0.0, 0.0, 0.0, 0.0], [-0.2, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(g.edge_attr, torch.tensor(attr))
    assert g.edge_index.dtype == torch.int64 and g.edge_attr.dtype == torch.float32
    assert g.num_nets == 3 and g.canvas == (0.0, 0.0, 10.0, 10.0) and g.names == ["A", "B", "P"]


def test_driver_is_the_output_pin(tmp_path):
    nets = FILES["tiny.nets"].replace("  A O : 1 0\n  B I : -1 1.5\n", "  B I : -1 1.5\n  A O : 1 0\n")
    c = read_bookshelf(write_tiny(tmp_path, tiny_nets=nets))
    assert driver_pins(c).tolist() == [1, 3, 5, 7]  # n0: the O pin (A), second in the file
    g = circuit_to_graph(c)
    assert g.edge_index[:, :3].tolist() == [[0, 0, 1], [1, 2, 3]]  # n0: A -> B, A -> c; n1: B -> P


def test_round_trip_to_bookshelf_units(tiny):
    v = macro_view(tiny)
    g = circuit_to_graph(v)
    np.testing.assert_allclose(graph_to_lower_left(g), v.positions, atol=1e-5)
    # Move B's centre to (2, 8) (normalised (-0.6, 0.6)): lower-left (1, 6.5); the pad stays put.
    pos = g.positions.clone()
    pos[1] = torch.tensor([-0.6, 0.6])
    pos[2] = torch.tensor([0.0, 0.0])
    full = lift_positions(tiny, v, graph_to_lower_left(g, pos))
    np.testing.assert_allclose(full, [[0, 0], [1, 6.5], [3, 0], [9, 9]], atol=1e-5)
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        lift_positions(tiny, v, full)


@pytest.mark.parametrize("name", ["ibm01", "ibm06"])
def test_ibm_macro_graph(name):
    c = ibm(name)
    v = macro_view(c)
    macros, pads = IBM[name][4], IBM[name][3]
    assert (v.num_macros, int(v.is_fixed.sum()), v.num_nodes) == (macros, pads, macros + pads)
    assert hpwl_macro_only(v) == pytest.approx(hpwl_macro_only(c), rel=1e-12)
    g = circuit_to_graph(v)
    e = g.edge_index.shape[1]
    assert g.edge_attr.shape == (e, 4) and e % 2 == 0 and int(g.edge_index.max()) < g.num_nodes
    assert torch.equal(g.edge_index[:, : e // 2].flip(0), g.edge_index[:, e // 2 :])
    assert int((~g.is_port).sum()) == macros
    assert g.positions.abs().max() <= 1.0 and g.sizes.max() < 1.0
    np.testing.assert_allclose(graph_to_lower_left(g), v.positions, atol=1e-3)
    # Normalised HPWL = Bookshelf HPWL of the view with x scaled by 2/W and y by 2/H.
    _, _, w, h = c.canvas
    scaled = v.with_positions(v.positions)
    scaled.positions, scaled.sizes = v.positions * [2 / w, 2 / h], v.sizes * [2 / w, 2 / h]
    scaled.pin_offset = v.pin_offset * [2 / w, 2 / h]
    assert float(hpwl_normalised(g, g.positions)) == pytest.approx(hpwl_full(scaled), rel=1e-5)


def test_ibm05_has_an_empty_macro_view():
    c = ibm("ibm05")
    v = macro_view(c)
    assert v.num_macros == 0 and v.num_nodes == int(c.is_fixed.sum())
    g = circuit_to_graph(v)
    assert int((~g.is_port).sum()) == 0
    assert legality_score(g) == 1.0 and float(overlap_area(g)) == 0.0
    torch.testing.assert_close(hpwl_normalised(g, g.positions[None]), torch.zeros(1))
    assert np.array_equal(lift_positions(c, v, graph_to_lower_left(g)), c.positions)
