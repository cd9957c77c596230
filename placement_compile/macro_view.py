"""Macro-only view of a Bookshelf circuit, and lifting its placement back to the full circuit.

The view keeps the macros (movable nodes taller than a row) and the fixed nodes (the pads,
plus any /FIXED node: obstacles the macros must respect), and reduces every net to its pins on
kept nodes; nets left with fewer than two pins are dropped. Node and net order is preserved.
"""
from __future__ import annotations

import numpy as np

from placement_compile.bookshelf import Circuit


def macro_view(circuit: Circuit) -> Circuit:
    """Macros + fixed nodes of `circuit`, nets reduced to their pins on those nodes.

    `source_index` [N'] of the result maps its nodes back to rows of `circuit`.
    A circuit without macros (ibm05) gives a view with only fixed nodes (maybe no nets).
    """
    keep = np.flatnonzero(circuit.is_macro | circuit.is_fixed)
    new_id = np.full(circuit.num_nodes, -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    pin_kept = new_id[circuit.pin_node] >= 0
    pins_per_net = np.bincount(circuit.pin_net[pin_kept], minlength=circuit.num_nets)
    nets = np.flatnonzero(pins_per_net >= 2)
    net_id = np.full(circuit.num_nets, -1, dtype=np.int64)
    net_id[nets] = np.arange(len(nets))
    pins = np.flatnonzero(pin_kept & (net_id[circuit.pin_net] >= 0))
    parent = circuit.source_index
    return Circuit(
        name=f"{circuit.name}-macros",
        node_names=[circuit.node_names[i] for i in keep],
        sizes=circuit.sizes[keep].copy(),
        positions=circuit.positions[keep].copy(),
        orient=[circuit.orient[i] for i in keep],
        is_terminal=circuit.is_terminal[keep].copy(),
        is_fixed=circuit.is_fixed[keep].copy(),
        net_names=[circuit.net_names[i] for i in nets],
        pin_node=new_id[circuit.pin_node[pins]],
        pin_offset=circuit.pin_offset[pins].copy(),
        pin_dir=circuit.pin_dir[pins].copy(),
        pin_net=net_id[circuit.pin_net[pins]],
        canvas=circuit.canvas,
        row_height=circuit.row_height,
        source_index=keep if parent is None else parent[keep],
    )


def lift_positions(circuit: Circuit, view: Circuit, lower_left: np.ndarray) -> np.ndarray:
    """Positions [N, 2] of `circuit` with the view's nodes moved to `lower_left` [N', 2].

    Fixed nodes keep their place whatever `lower_left` says.
    """
    if view.source_index is None:
        raise ValueError("view has no source_index: build it with macro_view(circuit)")
    ll = np.asarray(lower_left, dtype=np.float64)
    if ll.shape != (view.num_nodes, 2):
        raise ValueError(f"lower_left must be [{view.num_nodes}, 2], got {ll.shape}")
    out = circuit.positions.copy()
    movable = ~view.is_fixed
    out[view.source_index[movable]] = ll[movable]
    return out
