import pytest
import torch

from placement_compile.gatv2 import GATv2, add_self_loops_mean
from placement_compile.model import (CONFIGS, AttGNN, DenoiserInputs, parameter_count,
                                     published_parameter_count)
from tests.placement.helpers import tiny_graph

# Published counts (paper) and ours: the authors allocate one unused GroupNorm(1, width) per GNN
# block and per attention block (2 x width parameters each); we omit them.
PUBLISHED = {"small": 233_474, "medium": 1_226_178, "large": 6_285_058}
OURS = {"small": 233_090, "medium": 1_225_026, "large": 6_281_986}


@pytest.mark.parametrize("name", ["small", "medium", "large"])
def test_parameter_counts_exact(name):
    cfg = CONFIGS[name]
    model = AttGNN(cfg)
    assert parameter_count(model) == OURS[name]
    unused_groupnorms = cfg.blocks * 2 * (cfg.gnn_width + cfg.att_width)
    assert parameter_count(model) + unused_groupnorms == PUBLISHED[name]
    assert published_parameter_count(cfg) == PUBLISHED[name]


def test_self_loops_mean_fill():
    ei = torch.tensor([[0, 1, 2, 2], [1, 1, 1, 0]])  # (1 -> 1) is an existing loop: dropped
    ea = torch.tensor([[1.0], [9.0], [3.0], [5.0]])
    out_ei, out_ea = add_self_loops_mean(ei, ea, 4)
    assert out_ei.tolist() == [[0, 2, 2, 0, 1, 2, 3], [1, 1, 0, 0, 1, 2, 3]]
    assert out_ea.flatten().tolist() == [1.0, 3.0, 5.0, 5.0, 2.0, 0.0, 0.0]


def test_gatv2_matches_torch_geometric():
    tgn = pytest.importorskip("torch_geometric.nn", reason="torch_geometric is not installed")
    torch.manual_seed(0)
    V, E, F_in = 11, 30, 10
    ei = torch.randint(0, V, (2, E))
    ea = torch.randn(E, 4)
    ref = tgn.GATv2Conv(F_in, 8, heads=4, edge_dim=4, add_self_loops=True, fill_value="mean")
    ours = GATv2(F_in, 32, heads=4, edge_dim=4)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, V, F_in)
    loop_ei, loop_ea = add_self_loops_mean(ei, ea, V)
    got = ours(x, loop_ei, loop_ea)
    for b in range(3):
        torch.testing.assert_close(got[b], ref(x[b], ei, ea), rtol=1e-5, atol=1e-5)


def test_forward_shapes_and_batch_independence():
    torch.manual_seed(0)
    graph = tiny_graph()
    inp = DenoiserInputs.from_graph(graph)
    model = AttGNN(CONFIGS["small"]).eval()
    x = torch.randn(4, graph.num_nodes, 2)
    t = torch.tensor([0.1, 0.4, 0.7, 0.99])
    out = model(x, t, inp)
    assert out.shape == (4, graph.num_nodes, 2)
    single = model(x[2:3], t[2:3], inp)
    torch.testing.assert_close(out[2:3], single, rtol=1e-5, atol=1e-5)


def test_forward_rejects_bad_shapes():
    graph = tiny_graph()
    model = AttGNN(CONFIGS["small"])
    with pytest.raises(ValueError, match="x_t must be"):
        model(torch.zeros(2, graph.num_nodes + 1, 2), torch.zeros(2), DenoiserInputs.from_graph(graph))
