"""The FX path on MoE blocks written by hand (handwritten_*.py): every form that computes
sum_k w_k * expert_{e_k}(x) with a unit foe::experts_swiglu has is rewritten and equals the eager
module at several shapes; every form that computes something else is left as written with its
reason; a rewrite that changes the outputs is undone by translation validation."""
import dataclasses
import importlib

import pytest
import torch
from foe_testing import EXACT_MAX_REL, max_rel
from handwritten_moes import SUPPORTED, SUPPORTED_UNITS
from handwritten_near_misses import REFUSED
from handwritten_routers import FUSED_VARIANTS, GRAPH_ROUTED, GroupLimitedTop2
from user_models import UserMoETransformer

from foe_compile import convert

VOCAB = 96


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_with(moe_cls, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UserMoETransformer(moe_cls, vocab=VOCAB, experts=4, top_k=2).eval()


@torch.no_grad()
@pytest.mark.parametrize("moe_cls", SUPPORTED + SUPPORTED_UNITS, ids=lambda c: c.__name__)
def test_supported_forms_and_units_are_rewritten_and_exact(moe_cls):
    model = model_with(moe_cls)
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    assert report.exact and not report.untouched_blocks, report.to_table()
    assert [layer.kind for layer in report.layers] == ["moe", "moe"]
    assert sum("experts_swiglu" in str(n.target) for n in converted.graph.nodes) == 2
    for batch, length in [(2, 7), (1, 5), (3, 4), (1, 1)]:
        ids = tokens(batch, length, seed=batch * 10 + length)
        assert max_rel(converted(ids), model(ids)) <= EXACT_MAX_REL


@torch.no_grad()
def test_the_clamp_in_a_clamped_unit_is_kept():
    """ClampedGLU's limit (0.5) is reached at these scales: a rewrite that dropped the clamp, the
    +1 or the interleaving would differ by far more than the tolerance."""
    import handwritten_moes
    model = model_with(handwritten_moes.ClampedGLUExperts)
    converted, _ = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    op = next(n for n in converted.graph.nodes if "experts_swiglu" in str(n.target))
    assert op.args[8] == "silu" and op.args[11:14] == (1.702, 0.5, 1.0)
    far, _ = convert(model_with(handwritten_moes.FarClampedGLUExperts), mode="exact", calibration_inputs=tokens(2, 7))
    op = next(n for n in far.graph.nodes if "experts_swiglu" in str(n.target))
    assert op.args[12] == 1000.0  # beyond the random probes' range, found from the unit's constants
    ids = tokens(3, 6, seed=3)
    assert max_rel(converted(ids), model(ids)) <= EXACT_MAX_REL


@torch.no_grad()
@pytest.mark.parametrize("moe_cls", SUPPORTED[2:5], ids=lambda c: c.__name__)
def test_supported_forms_build_the_foe_form(moe_cls):
    model = model_with(moe_cls)
    converted, report = convert(model, mode="foe", calibration_inputs=tokens(2, 7))
    assert report.num_groups == 2 and not report.exact and report.structurally_exact is False
    assert converted(tokens(1, 5)).shape == (1, 5, VOCAB)


@torch.no_grad()
@pytest.mark.parametrize("moe_cls", FUSED_VARIANTS, ids=lambda c: c.__name__)
def test_routing_variants_are_fused_in_both_forms(moe_cls):
    """Sigmoid scores, a router bias, a correction bias and a routed scaling factor are arguments of
    foe::sum_route_dispatch: fused and exact in exact mode, quota-routed in the FoE form."""
    model = model_with(moe_cls)
    ids = tokens(2, 7)
    converted, report = convert(model, mode="exact", calibration_inputs=ids)
    assert report.exact and not report.untouched_blocks, report.to_table()
    assert sum("sum_route_dispatch" in str(n.target) for n in converted.graph.nodes) == 2
    for batch, length in [(1, 5), (3, 4)]:
        x = tokens(batch, length, seed=length)
        assert max_rel(converted(x), model(x)) <= EXACT_MAX_REL
    foe, report = convert(model, mode="foe", calibration_inputs=ids)
    assert report.num_groups == 2 and not report.exact and foe(tokens(1, 5)).shape == (1, 5, VOCAB)


@torch.no_grad()
def test_the_foe_form_replaces_a_group_limit_by_the_quota():
    """Exact form: the fused op computes the source's group limit (n_group = 2, topk_group = 1); FoE form:
    the quota replaces it (n_group = 1 in the op) and every MoE layer's report says so."""
    model = model_with(GroupLimitedTop2)
    ids = tokens(2, 7)
    for mode, n_group in (("exact", 2), ("foe", 1)):
        converted, report = convert(model, mode=mode, calibration_inputs=ids)
        routes = [n for n in converted.graph.nodes if "sum_route_dispatch" in str(n.target)]
        assert len(routes) == 2 and all(n.args[12] == n_group for n in routes)
        replaced = ["group limit replaced by the quota" in " ".join(layer.reasons) for layer in report.layers]
        assert replaced == [mode == "foe"] * 2, report.to_table()


@torch.no_grad()
@pytest.mark.parametrize("moe_cls, reason", GRAPH_ROUTED, ids=lambda c: getattr(c, "__name__", ""))
def test_unfusable_routing_stays_as_written_and_the_experts_are_lowered(moe_cls, reason):
    model = model_with(moe_cls)
    ids = tokens(2, 7)
    converted, report = convert(model, mode="exact", calibration_inputs=ids)
    assert report.exact and not report.untouched_blocks, report.to_table()
    assert all(any(reason in note for note in layer.notes) for layer in report.layers), report.to_table()
    assert not any("sum_route_dispatch" in str(n.target) for n in converted.graph.nodes)
    for batch, length in [(1, 5), (3, 4), (1, 1)]:  # (1, 1): Llama-4-style dense experts capture only statically
        x = tokens(batch, length, seed=length)
        assert max_rel(converted(x), model(x)) <= EXACT_MAX_REL
    with pytest.raises(ValueError, match="the FoE form needs quota routing in foe::sum_route_dispatch"):
        convert(model, mode="foe", calibration_inputs=ids)


@torch.no_grad()
@pytest.mark.parametrize("moe_cls, reason", REFUSED, ids=lambda c: getattr(c, "__name__", ""))
def test_other_computations_are_left_as_written_with_a_reason(moe_cls, reason):
    model = model_with(moe_cls)
    ids = tokens(2, 7)
    with pytest.raises(ValueError, match="no MoE block of UserMoETransformer can be rewritten exactly") as err:
        convert(model, mode="exact", calibration_inputs=ids)
    assert reason in str(err.value)
    with pytest.raises(ValueError, match="FoE form needs every MoE block rewritten|no MoE block"):
        convert(model, mode="foe", calibration_inputs=ids)


@torch.no_grad()
def test_a_wrong_rewrite_is_undone_by_translation_validation(monkeypatch):
    """Make the matcher swap gate and up for the first block's experts (a plausible bug): the
    rewrite no longer equals the source, so validation leaves that block as written and says so."""
    select_loop = importlib.import_module("foe_compile.passes.select_loop")
    real = select_loop.match_expert_mlp

    def swapped_in_block_0(down):
        found = real(down)
        if isinstance(found, select_loop.ExpertMLP) and "blocks_0" in found.gate_up[0].name:
            return dataclasses.replace(found, gate_up=found.gate_up[::-1])
        return found

    monkeypatch.setattr(select_loop, "match_expert_mlp", swapped_in_block_0)
    model = model_with(SUPPORTED[2])
    ids = tokens(2, 7)
    converted, report = convert(model, mode="exact", calibration_inputs=ids)
    (why,) = report.untouched_blocks
    assert "blocks_0" in why and "failed translation validation" in why
    assert report.exact and [layer.kind for layer in report.layers].count("moe") == 1
    assert max_rel(converted(ids), model(ids)) <= EXACT_MAX_REL
    with pytest.raises(ValueError, match="failed translation validation"):
        convert(model, mode="foe", calibration_inputs=ids)


@torch.no_grad()
def test_report_exact_is_the_measurement(monkeypatch):
    """report.exact is the measurement, not the configuration: under a tolerance no fp32 rewrite
    meets, an exact-by-construction conversion is reported NOT exact, with the number in the
    header (module path), and the FX path leaves every block as written and says why."""
    import foe_compile.validation as validation
    from foe_compile import builtin_model

    monkeypatch.setitem(validation.TOLERANCE, torch.float32, 0.0)
    _, report = convert(builtin_model("olmoe-tiny"), mode="exact")
    assert report.structurally_exact and not report.exact and report.validation_error > 0
    assert "NOT exact: measured max rel err" in report.to_table().splitlines()[0]
    with pytest.raises(ValueError, match="failed translation validation"):
        convert(model_with(SUPPORTED[0]), mode="exact", calibration_inputs=tokens(2, 7))


def test_validation_error_sees_through_infinities():
    """An inf in the source's outputs (a masked vocabulary) must not hide errors elsewhere, and
    an inf or NaN the source does not have is a failure."""
    from foe_compile.validation import max_relative_error

    ref = torch.tensor([[1.0, 2.0, float("-inf")]])
    run = lambda out: max_relative_error(lambda: out, [[ref]], [()])  # noqa: E731
    assert run(torch.tensor([[1.0, 2.0, float("-inf")]])) == 0.0
    assert run(torch.tensor([[1.0, 2.2, float("-inf")]])) == pytest.approx(0.1)
    assert run(torch.tensor([[1.0, 2.0, float("inf")]])) == float("inf")
    assert run(torch.tensor([[1.0, float("nan"), float("-inf")]])) == float("inf")
    assert run(torch.tensor([[1.0, 2.0, 3.0]])) == float("inf")


class BatchOneBranch(UserMoETransformer):
    """Computes something else at batch 1: a graph captured at batch 2 must not serve batch 1."""

    def forward(self, ids):
        out = super().forward(ids)
        return out * 2 if ids.shape[0] == 1 else out


@torch.no_grad()
def test_a_graph_is_never_reused_outside_the_sizes_it_was_captured_for():
    torch.manual_seed(0)
    model = BatchOneBranch(SUPPORTED[2], vocab=VOCAB, experts=4, top_k=2).eval()
    converted, _ = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    ids = tokens(1, 5)
    assert max_rel(converted(ids), model(ids)) <= EXACT_MAX_REL
    assert len(converted.graphs) == 2 and len(converted.state_dict()) == len(model.state_dict())


@torch.no_grad()
def test_a_refused_block_is_reported_next_to_converted_ones():
    torch.manual_seed(0)
    model = model_with(SUPPORTED[2])
    model.blocks[0].moe = REFUSED[0][0](32, 24, 4, 2)
    _, report = convert(model.eval(), mode="exact", calibration_inputs=tokens(2, 7))
    (why,) = report.untouched_blocks
    assert "blocks_0" in why and REFUSED[0][1] in why and report.exact
    with pytest.raises(ValueError, match="FoE form needs every MoE block rewritten"):
        convert(model, mode="foe", calibration_inputs=tokens(2, 7))


@torch.no_grad()
def test_a_recapture_that_cannot_be_rewritten_runs_the_source_graph(monkeypatch):
    """If a new shape class's rewrite does not validate, those shapes run the captured source
    graph unchanged: still the source's outputs, never an error at call time."""
    generic = importlib.import_module("foe_compile.generic")
    torch.manual_seed(0)
    model = BatchOneBranch(SUPPORTED[2], vocab=VOCAB, experts=4, top_k=2).eval()
    converted, _ = convert(model, mode="exact", calibration_inputs=tokens(2, 7))

    def fails(*args, **kwargs):
        raise ValueError("no MoE block can be rewritten exactly (simulated)")

    monkeypatch.setattr(generic, "_convert_at", fails)
    ids = tokens(1, 5)
    assert max_rel(converted(ids), model(ids)) <= EXACT_MAX_REL
    assert not any("experts_swiglu" in str(n.target) for n in converted.graphs[1].graph.nodes)


@torch.no_grad()
def test_a_router_scored_in_bf16_is_not_fused():
    """The fused op scores in float32; a bf16 model whose router scores in bf16 would pick other
    experts for some tokens after fusing, so its routing stays as written (and the FoE form refuses)."""
    from handwritten_routers import SigmoidRouter

    model = model_with(SigmoidRouter).to(torch.bfloat16)
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    assert report.exact, report.to_table()
    assert all("scores computed in torch.bfloat16" in " ".join(layer.notes) for layer in report.layers)
    assert not any("sum_route_dispatch" in str(n.target) for n in converted.graph.nodes)


@torch.no_grad()
def test_a_rewrite_that_raises_is_reported_with_what_it_raised(monkeypatch):
    """A rewrite whose graph raises (here: expert weights of the wrong width) is undone and the reason
    says what was raised, not only an infinite error."""
    lower_experts = importlib.import_module("foe_compile.passes.lower_experts")
    real = lower_experts._stacked_weights

    def narrowed(g, m):
        gate_up, down, b1, b2 = real(g, m)
        if "blocks_0" in m.name:
            down = g.call_function(torch.ops.aten.slice.Tensor, (down, 2, 0, 3))
        return gate_up, down, b1, b2

    monkeypatch.setattr(lower_experts, "_stacked_weights", narrowed)
    model = model_with(SUPPORTED[2])
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    (why,) = report.untouched_blocks
    assert "blocks_0" in why and "the rewritten graph raised" in why and "down must be" in why, why
    assert report.exact
