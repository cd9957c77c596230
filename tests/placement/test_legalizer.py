from dataclasses import replace

import torch

from placement_compile.bookshelf import iccad04_aux, read_bookshelf
from placement_compile.guidance import GuidanceConfig
from placement_compile.legalizer import LegalizerConfig, hard_violation, legalize
from placement_compile.macro_view import macro_view
from placement_compile.metrics import legality_score
from placement_compile.model import load_model
from placement_compile.cli import DEFAULT_CHECKPOINT
from placement_compile.sampler import PlaceConfig, place
from placement_compile.to_graph import circuit_to_graph
from tests.placement.helpers import tiny_graph


def test_hard_violation_by_hand():
    sizes = torch.full((3, 2), 0.2)
    movable = torch.tensor([True, True, False])
    x = torch.tensor([[[0.0, 0.0], [0.15, 0.1], [0.0, 0.0]]])  # overlap depth min(0.05, 0.1); port ignored
    torch.testing.assert_close(hard_violation(x, sizes, movable), torch.tensor([0.05]))
    x = torch.tensor([[[0.0, 0.0], [0.95, 0.0], [0.0, 0.0]]])  # 0.05 past the right edge
    torch.testing.assert_close(hard_violation(x, sizes, movable), torch.tensor([0.05]))


def test_legalizes_a_tiny_overlapping_layout_and_ports_stay():
    graph = tiny_graph(num_macros=6, num_ports=2)
    x = (torch.rand(3, graph.num_nodes, 2, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.3
    x[:, graph.is_port] = graph.positions[graph.is_port]
    out, steps = legalize(graph, x, LegalizerConfig(steps=4000), progress=False)
    assert steps < 4000  # stopped early: every sample legal
    assert bool((hard_violation(out, graph.sizes, ~graph.is_port) <= 1e-6).all())
    assert [legality_score(graph, out[b]) for b in range(3)] == [1.0, 1.0, 1.0]
    torch.testing.assert_close(out[:, graph.is_port], x[:, graph.is_port], rtol=0, atol=0)


def test_ibm01_macro_only_legality_after_legalizer():
    graph = circuit_to_graph(macro_view(read_bookshelf(iccad04_aux("ibm01"))))
    model = load_model(str(DEFAULT_CHECKPOINT))
    cfg = PlaceConfig(samples=2, steps=10, seed=0, progress=False, guidance=GuidanceConfig(steps=5),
                      legalizer=replace(LegalizerConfig(), steps=3000))
    result = place(model, graph, cfg)
    print(f"ibm01 macro-only legality after the legalizer: {result.legality} "
          f"({result.legalizer_steps} legalizer steps, {result.seconds})")
    assert max(result.legality) >= 0.99
    assert result.legality[result.best] >= max(result.legality) - 1e-9
    torch.testing.assert_close(result.positions[graph.is_port], graph.positions[graph.is_port], rtol=0, atol=0)
