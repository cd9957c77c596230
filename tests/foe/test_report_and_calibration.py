"""ConversionReport contents, communication formulas and calibrated expert assignment."""
import json

import pytest
import torch
from foe_testing import fresh_copy, tokens

from foe_compile import builtin_model, convert
from foe_compile.assignment import calibrated
from foe_compile.comm import ep_volume, exact_volume, foe_volume, multinode_speedup_asymptote


def test_report_measures_and_serialises(source):
    ids = tokens(2, 16)
    _, report = convert(fresh_copy(source), calibration_inputs=ids)
    data = json.loads(report.to_json())
    assert data["calibration_tokens"] == 32 and data["mode"] == "foe"
    assert not report.exact
    for layer in report.layers:
        assert not layer.exact and layer.reasons
        assert 0 < layer.hidden_rel_error < 1
        if layer.kind == "moe":
            assert 0 < layer.routing_agreement <= 1 and 0 < layer.prob_mass_kept <= 1
    assert 0 < report.logits_rel_error < 1
    table = report.to_table()
    assert "quota routing" in table and "expert-parallel all-to-all" in table


def test_communication_formulas():
    # OLMoE-style FoE-7B on one 8-GPU node (k=8, H=8): FoE moves k times less than EP.
    assert ep_volume(8, 8) == 14.0
    assert foe_volume(8, 8, 8) == 1.75
    assert ep_volume(8, 8) / foe_volume(8, 8, 8) == 8.0
    assert exact_volume(8, 8, 8) == 3.5
    # More GPUs than groups: an intra-group all-to-all joins the all-reduce.
    assert foe_volume(2, 2, 8) == 1.0 + 2 * 2 * 6 / 8
    assert multinode_speedup_asymptote(8, 8, 1.0) == pytest.approx(64 / 71)


def test_report_communication_uses_model_numbers():
    _, report = convert(builtin_model("olmoe-1b-7b"))
    c = report.communication
    assert (c.gpus, c.num_layers, c.hidden_size) == (8, 16, 2048)
    assert c.ep_per_layer / c.foe_per_layer == 8.0
    assert c.bytes_per_token(c.foe_per_layer) == 1.75 * 2048 * 16 * 2


def test_calibrated_partition_separates_co_selected_experts():
    counts = torch.zeros(8, 8, dtype=torch.long)
    for a, b in [(0, 1), (2, 3), (4, 5), (6, 7)]:
        counts[a, b] = counts[b, a] = 100
    counts += torch.diag(torch.full((8,), 100))
    perm = calibrated(counts.numpy(), num_groups=2)
    groups = [set(perm[:4]), set(perm[4:])]
    assert sorted(perm) == list(range(8))
    for a, b in [(0, 1), (2, 3), (4, 5), (6, 7)]:
        assert (a in groups[0]) != (b in groups[0]), f"co-selected {a},{b} share a group"


@torch.no_grad()
def test_calibrated_assignment_raises_routing_agreement():
    """Router rows built so experts come in pairs (2j, 2j+1) that are always co-selected:
    contiguous blocks hold both of a pair and quota routing drops one; calibration splits them."""
    src = builtin_model("mixtral-tiny", num_local_experts=8, num_experts_per_tok=2, seed=5)
    torch.manual_seed(0)
    for layer in src.model.layers:
        u = torch.nn.functional.normalize(torch.randn(4, src.config.hidden_size), dim=-1) * 20
        layer.mlp.gate.weight.copy_(torch.stack([u[j // 2] * (1.0 if j % 2 == 0 else 0.98) for j in range(8)]))
    ids = tokens(4, 32, seed=7)
    _, plain = convert(fresh_copy(src), num_groups=2, calibration_inputs=ids)
    model, calib = convert(fresh_copy(src), num_groups=2, expert_assignment="calibrated", calibration_inputs=ids)
    plain_agree = [lr.routing_agreement for lr in plain.layers]
    calib_agree = [lr.routing_agreement for lr in calib.layers]
    assert max(plain_agree) <= 0.75 and min(calib_agree) >= 0.95, (plain_agree, calib_agree)
    assert calib.logits_rel_error < plain.logits_rel_error
    assert sorted(model.foe_config.layer_assignments[0]) == list(range(8))
