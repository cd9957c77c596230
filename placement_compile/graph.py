"""The normalised circuit graph shared by the netlist readers, the denoiser and the sampler.

Coordinates: the canvas maps to [-1, 1]^2; sizes and pin offsets are scaled by 2 / canvas
size (per axis). Nets become stars from their driver pin; every star edge is stored in both
directions with a 4-d attribute (source pin offset, destination pin offset).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class PlacementGraph:
    sizes: Tensor  # [V, 2] float32: (width, height), normalised
    positions: Tensor  # [V, 2] float32: object centres, normalised (ports: their fixed place)
    is_port: Tensor  # [V] bool: fixed objects (pads / terminals) that never move
    edge_index: Tensor  # [2, E] int64: (source node, destination node), both directions
    edge_attr: Tensor  # [E, 4] float32: (src pin dx, dy, dst pin dx, dy), normalised
    pin_node: Tensor  # [P] int64: object of every pin (for HPWL)
    pin_offset: Tensor  # [P, 2] float32: pin offset from its object's centre, normalised
    pin_net: Tensor  # [P] int64: net of every pin, nets numbered 0..num_nets-1
    num_nets: int
    # (x0, y0, width, height) of the canvas in source units, to map results back.
    canvas: tuple[float, float, float, float] = (-1.0, -1.0, 2.0, 2.0)
    names: list[str] | None = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return int(self.sizes.shape[0])

    def to(self, device: torch.device | str) -> PlacementGraph:
        moved = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, Tensor)}
        return replace(self, **moved)

    def to_source_units(self, positions: Tensor) -> Tensor:
        """Normalised centres [..., V, 2] -> centres in source units."""
        x0, y0, w, h = self.canvas
        scale = positions.new_tensor([w / 2, h / 2])
        origin = positions.new_tensor([x0 + w / 2, y0 + h / 2])
        return positions * scale + origin

    def from_source_units(self, centres: Tensor) -> Tensor:
        """Centres in source units [..., V, 2] -> normalised centres."""
        x0, y0, w, h = self.canvas
        scale = centres.new_tensor([2 / w, 2 / h])
        origin = centres.new_tensor([x0 + w / 2, y0 + h / 2])
        return (centres - origin) * scale
