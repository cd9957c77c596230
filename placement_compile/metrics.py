"""Placement metrics, each in one clearly labelled convention.

HPWL (half-perimeter wirelength) = sum over nets of (max - min) of pin x plus (max - min) of
pin y, with pin = object centre + pin offset.

- `hpwl_normalised(graph, positions)`: on a PlacementGraph, normalised units, batched torch
  [B, V, 2] -> [B] (differentiable; the sampler's HPWL).
- `hpwl_full(circuit)`: every pin of every net, Bookshelf units.
- `hpwl_macro_only(circuit)`: pins on macros only (pads and cells excluded); nets left with
  fewer than two macro pins drop out; Bookshelf units.

Legality = area(union of non-port objects ∩ canvas) / sum of their areas (1.0 = no overlap
and nothing outside the canvas), computed exactly with shapely. Overlap = total pairwise
intersection area of non-port objects (each pair once), vectorised in torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import shapely
import torch
from torch import Tensor

from placement_compile.graph import PlacementGraph

if TYPE_CHECKING:
    from placement_compile.bookshelf import Circuit

# Rows of the [rows, V] pairwise work arrays in overlap_area_boxes (bounds memory per chunk).
_OVERLAP_ROWS = 1024


def hpwl_normalised(graph: PlacementGraph, positions: Tensor) -> Tensor:
    """Normalised HPWL of centres `positions` [B, V, 2] (or [V, 2]) -> [B] (or []).

    sum_n (max_{p in n} x_p - min_{p in n} x_p) + (same for y), x_p = positions[node_p] + offset_p.
    """
    if positions.shape[-2:] != (graph.num_nodes, 2):
        raise ValueError(f"positions must be [B, {graph.num_nodes}, 2], got {tuple(positions.shape)}")
    squeeze = positions.dim() == 2
    pos = positions.unsqueeze(0) if squeeze else positions  # [B, V, 2]
    pins = pos[:, graph.pin_node] + graph.pin_offset.to(pos.dtype)  # [B, P, 2]
    b = pos.shape[0]
    index = graph.pin_net.view(1, -1, 1).expand(b, -1, 2)
    # NOTE: start from -inf/+inf, not zeros with include_self=False: amax/amin backward splits
    # the gradient with a zero start that ties the result. Empty nets give -inf, clamped to 0.
    hi = pins.new_full((b, graph.num_nets, 2), -torch.inf).scatter_reduce(1, index, pins, "amax")
    lo = pins.new_full((b, graph.num_nets, 2), torch.inf).scatter_reduce(1, index, pins, "amin")
    out = (hi - lo).clamp_min(0).sum(dim=(1, 2))
    return out[0] if squeeze else out


def _hpwl_pins(pin_xy: np.ndarray, pin_net: np.ndarray, num_nets: int) -> float:
    """sum over nets of the half perimeter of pins [P, 2] grouped by pin_net [P] (numpy)."""
    if len(pin_net) == 0:
        return 0.0
    hi = np.full((num_nets, 2), -np.inf)
    lo = np.full((num_nets, 2), np.inf)
    np.maximum.at(hi, pin_net, pin_xy)
    np.minimum.at(lo, pin_net, pin_xy)
    used = np.isfinite(hi[:, 0])
    return float((hi[used] - lo[used]).sum())


def _pin_xy(circuit: Circuit, lower_left: np.ndarray | None) -> np.ndarray:
    ll = circuit.positions if lower_left is None else np.asarray(lower_left, dtype=np.float64)
    if ll.shape != circuit.positions.shape:
        raise ValueError(f"lower_left must be [{circuit.num_nodes}, 2], got {ll.shape}")
    centres = ll + circuit.sizes / 2
    return centres[circuit.pin_node] + circuit.pin_offset


def hpwl_full(circuit: Circuit, lower_left: np.ndarray | None = None) -> float:
    """Full pin-to-pin HPWL over all nets, Bookshelf units (positions: lower-left [N, 2])."""
    return _hpwl_pins(_pin_xy(circuit, lower_left), circuit.pin_net, circuit.num_nets)


def hpwl_macro_only(circuit: Circuit, lower_left: np.ndarray | None = None) -> float:
    """Macro-only HPWL, Bookshelf units: macro pins only; nets with < 2 macro pins drop out."""
    on_macro = circuit.is_macro[circuit.pin_node]
    net = circuit.pin_net[on_macro]
    keep = np.bincount(net, minlength=circuit.num_nets) >= 2
    sel = keep[net]
    return _hpwl_pins(_pin_xy(circuit, lower_left)[on_macro][sel], net[sel], circuit.num_nets)


def legality_score_boxes(
    lower_left: np.ndarray, sizes: np.ndarray, canvas: tuple[float, float, float, float]
) -> float:
    """area(union of boxes ∩ canvas) / sum of box areas; boxes [N, 2] lower-left and sizes.

    1.0 for no boxes (nothing can be illegal).
    """
    ll = np.asarray(lower_left, dtype=np.float64).reshape(-1, 2)
    wh = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    total = float(wh.prod(1).sum())
    if len(ll) == 0 or total == 0.0:
        return 1.0
    boxes = shapely.box(ll[:, 0], ll[:, 1], ll[:, 0] + wh[:, 0], ll[:, 1] + wh[:, 1])
    x0, y0, w, h = canvas
    inside = shapely.intersection(shapely.union_all(boxes), shapely.box(x0, y0, x0 + w, y0 + h))
    return float(inside.area) / total


def legality_score(graph: PlacementGraph, positions: Tensor | None = None) -> float:
    """Legality of the non-port objects of `graph` at centres [V, 2] (default: graph.positions)."""
    pos = graph.positions if positions is None else positions
    movable = ~graph.is_port.cpu()
    centres = pos.detach().cpu().double()[movable].numpy()
    sizes = graph.sizes.cpu().double()[movable].numpy()
    return legality_score_boxes(centres - sizes / 2, sizes, (-1.0, -1.0, 2.0, 2.0))


def circuit_macro_legality(circuit: Circuit, lower_left: np.ndarray | None = None) -> float:
    """Legality of the macros of a Bookshelf circuit inside its canvas."""
    ll = circuit.positions if lower_left is None else np.asarray(lower_left, dtype=np.float64)
    m = circuit.is_macro
    return legality_score_boxes(ll[m], circuit.sizes[m], circuit.canvas)


def overlap_area_boxes(centres: Tensor, sizes: Tensor) -> Tensor:
    """Total pairwise overlap area, each pair once: centres [..., V, 2], sizes [V, 2] -> [...].

    sum_{i<j} relu(min(r_i, r_j) - max(l_i, l_j)) * (same for y), chunked over rows of i.
    """
    v = sizes.shape[0]
    lo, hi = centres - sizes / 2, centres + sizes / 2  # [..., V, 2]
    total = centres.new_zeros(centres.shape[:-2])
    for start in range(0, v, _OVERLAP_ROWS):
        rows = slice(start, min(start + _OVERLAP_ROWS, v))
        ext = torch.minimum(hi[..., rows, None, :], hi[..., None, :, :]) - torch.maximum(
            lo[..., rows, None, :], lo[..., None, :, :]
        )  # [..., r, V, 2]
        area = ext.clamp_min(0).prod(-1)  # [..., r, V]
        upper = torch.arange(start, rows.stop, device=sizes.device)[:, None] < torch.arange(v, device=sizes.device)
        total = total + (area * upper).sum(dim=(-2, -1))
    return total


def overlap_area(graph: PlacementGraph, positions: Tensor | None = None) -> Tensor:
    """Total pairwise overlap of non-port objects, normalised units: [..., V, 2] -> [...]."""
    pos = graph.positions if positions is None else positions
    movable = ~graph.is_port
    return overlap_area_boxes(pos[..., movable, :], graph.sizes[movable].to(pos.dtype))
