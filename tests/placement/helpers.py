"""Small hand-made PlacementGraphs shared by the sampler, model and training tests."""
from __future__ import annotations

import torch

from placement_compile.graph import PlacementGraph


def tiny_graph(num_macros: int = 5, num_ports: int = 2, seed: int = 0) -> PlacementGraph:
    """num_macros movable squares plus num_ports zero-size ports on the left edge, one star net
    per macro driving its right neighbour and the first port."""
    g = torch.Generator().manual_seed(seed)
    V = num_macros + num_ports
    sizes = torch.cat([0.1 + 0.2 * torch.rand(num_macros, 2, generator=g), torch.zeros(num_ports, 2)])
    positions = torch.cat([torch.rand(num_macros, 2, generator=g) * 1.4 - 0.7,
                           torch.stack([-torch.ones(num_ports), torch.linspace(-0.5, 0.5, num_ports)], 1)])
    is_port = torch.arange(V) >= num_macros
    pin_node, pin_net, edges = [], [], []
    for net in range(num_macros):
        members = [net, (net + 1) % num_macros, num_macros]
        pin_node += members
        pin_net += [net] * len(members)
        edges += [(net, m) for m in members[1:]]
    pin_node_t = torch.tensor(pin_node)
    pin_offset = (torch.rand(len(pin_node), 2, generator=g) - 0.5) * sizes[pin_node_t] * 0.5
    src = torch.tensor([e[0] for e in edges])
    dst = torch.tensor([e[1] for e in edges])
    # pin offsets of the star edges: driver pin (first pin of its net) and the sink's pin.
    first_pin = torch.arange(num_macros) * 3
    drv = pin_offset[first_pin.repeat_interleave(2)]
    snk = pin_offset[torch.stack([first_pin + 1, first_pin + 2], 1).flatten()]
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    edge_attr = torch.cat([torch.cat([drv, snk], 1), torch.cat([snk, drv], 1)])
    return PlacementGraph(sizes=sizes, positions=positions, is_port=is_port, edge_index=edge_index,
                          edge_attr=edge_attr, pin_node=pin_node_t, pin_offset=pin_offset,
                          pin_net=torch.tensor(pin_net), num_nets=num_macros)
