"""Bookshelf circuit <-> normalised PlacementGraph.

Normalisation: the canvas (x0, y0, W, H) maps to [-1, 1]^2, so a centre c becomes
(c - canvas centre) * 2 / (W, H), and sizes and pin offsets are scaled by 2 / (W, H).
Ports are the fixed nodes. Each net is a star from its driver pin (the first pin marked O,
else the net's first pin) to every other pin; star edges within one node are left out (they
carry no placement information), and each edge is stored in both directions: first all
driver -> sink edges with attributes (driver offset, sink offset), then the reverses with
(sink offset, driver offset). Pin offsets are used as written (orientation N).
"""
from __future__ import annotations

import numpy as np
import torch

from placement_compile.bookshelf import Circuit
from placement_compile.graph import PlacementGraph


def driver_pins(circuit: Circuit) -> np.ndarray:
    """[M] pin index of every net's driver: its first "O" pin, else its first pin (-1 if empty)."""
    p = np.arange(circuit.num_pins)
    order = np.lexsort((p, circuit.pin_dir != "O", circuit.pin_net))
    nets, first = np.unique(circuit.pin_net[order], return_index=True)
    out = np.full(circuit.num_nets, -1, dtype=np.int64)
    out[nets] = order[first]
    return out


def circuit_to_graph(circuit: Circuit) -> PlacementGraph:
    """Normalised PlacementGraph of every node of `circuit` (use `macro_view` first for macros).

    positions [V, 2] are the circuit's current centres, normalised.
    """
    x0, y0, w, h = circuit.canvas
    if w <= 0 or h <= 0:
        raise ValueError(f"circuit {circuit.name} has an empty canvas {circuit.canvas}")
    scale = np.array([2.0 / w, 2.0 / h])
    centre = np.array([x0 + w / 2, y0 + h / 2])
    offset = circuit.pin_offset * scale  # [P, 2]

    driver = driver_pins(circuit)[circuit.pin_net]  # [P] driver pin of every pin's net
    sink = np.flatnonzero((np.arange(circuit.num_pins) != driver) & (circuit.pin_node != circuit.pin_node[driver]))
    src, dst = circuit.pin_node[driver[sink]], circuit.pin_node[sink]
    attr = np.concatenate([offset[driver[sink]], offset[sink]], 1)  # [E/2, 4]

    f32 = torch.float32
    return PlacementGraph(
        sizes=torch.as_tensor(circuit.sizes * scale, dtype=f32),
        positions=torch.as_tensor((circuit.positions + circuit.sizes / 2 - centre) * scale, dtype=f32),
        is_port=torch.as_tensor(circuit.is_fixed.copy()),
        edge_index=torch.as_tensor(np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])])).long(),
        edge_attr=torch.as_tensor(np.concatenate([attr, attr[:, [2, 3, 0, 1]]]), dtype=f32).reshape(-1, 4),
        pin_node=torch.as_tensor(circuit.pin_node.copy()),
        pin_offset=torch.as_tensor(offset, dtype=f32).reshape(-1, 2),
        pin_net=torch.as_tensor(circuit.pin_net.copy()),
        num_nets=circuit.num_nets,
        canvas=(float(x0), float(y0), float(w), float(h)),
        names=list(circuit.node_names),
    )


def graph_to_lower_left(graph: PlacementGraph, positions: torch.Tensor | None = None) -> np.ndarray:
    """Normalised centres [V, 2] (default: graph.positions) -> lower-left corners [V, 2] in source units."""
    pos = graph.positions if positions is None else positions
    if pos.shape != (graph.num_nodes, 2):
        raise ValueError(f"positions must be [{graph.num_nodes}, 2], got {tuple(pos.shape)}")
    _, _, w, h = graph.canvas
    centres = graph.to_source_units(pos.detach().cpu().double()).numpy()
    sizes = graph.sizes.detach().cpu().double().numpy() * np.array([w / 2, h / 2])
    return centres - sizes / 2
