"""torch.compile(model, backend="foe", fullgraph=True) end to end on CPU."""
import copy

import pytest
import torch
from foe_testing import EXACT_MAX_REL, max_rel, tokens
from user_models import DenseLoopMoE, IndexAddLoopMoE, UserMoETransformer

import foe_compile
from foe_compile import builtin_model, convert
from foe_compile.builtin import TINY


def pass_counts() -> dict[str, int]:
    return {r.name: r.rewrites for r in foe_compile.backend.last_results}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@torch.no_grad()
@pytest.mark.parametrize("name", TINY)
def test_unconverted_hf_model_compiles_to_foe_ops(name):
    model = builtin_model(name)
    ids = tokens(2, 9)
    expected = model(ids, use_cache=False).logits
    compiled = torch.compile(model, backend="foe", fullgraph=True, options={"compiler": "eager"})
    out = compiled(ids, use_cache=False).logits
    assert max_rel(out, expected) <= EXACT_MAX_REL
    counts = pass_counts()
    moe_layers = sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    assert counts["find_moe_blocks"] == moe_layers
    assert counts["fuse_sum_route_dispatch"] == moe_layers and counts["lower_experts"] == moe_layers
    assert counts["partition_groups"] == model.config.num_hidden_layers


@torch.no_grad()
@pytest.mark.parametrize("moe_cls", [DenseLoopMoE, IndexAddLoopMoE])
def test_user_written_moe_compiles(moe_cls):
    torch.manual_seed(0)
    model = UserMoETransformer(moe_cls)
    ids = tokens(2, 7, vocab=96)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):  # the index_add_ loop's where()
        out = torch.compile(model, backend="foe", fullgraph=True, options={"compiler": "eager"})(ids)
    assert max_rel(out, model(ids)) <= EXACT_MAX_REL
    assert pass_counts()["lower_experts"] == 2


@torch.no_grad()
@pytest.mark.parametrize("mode", ["exact", "foe"])
def test_converted_model_compiles_with_inductor(mode):
    model, _ = convert(builtin_model("qwen3-moe-tiny"), mode=mode)
    ids = tokens(2, 9)
    expected = model(ids, use_cache=False).logits
    out = torch.compile(model, backend="foe", fullgraph=True)(ids, use_cache=False).logits
    assert max_rel(out, expected) <= EXACT_MAX_REL
    assert pass_counts()["find_moe_blocks"] == 0  # already at the op boundary


@torch.no_grad()
def test_unconverted_model_with_inductor():
    model = builtin_model("mixtral-tiny")
    ids = tokens(1, 8)
    expected = model(ids, use_cache=False).logits
    out = torch.compile(model, backend="foe", fullgraph=True)(ids, use_cache=False).logits
    assert max_rel(out, expected) <= EXACT_MAX_REL


@torch.no_grad()
@pytest.mark.parametrize("name", TINY)
def test_no_graph_breaks(name):
    model = builtin_model(name)
    explanation = torch._dynamo.explain(model)(tokens(1, 6), use_cache=False)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    converted, _ = convert(copy.deepcopy(model))
    explanation = torch._dynamo.explain(converted)(tokens(1, 6), use_cache=False)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@torch.no_grad()
def test_graph_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("FOE_DUMP_GRAPHS", str(tmp_path))
    model = builtin_model("olmoe-tiny")
    torch.compile(model, backend="foe", fullgraph=True, options={"compiler": "eager"})(tokens(1, 4), use_cache=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "00-captured.txt" and names[-1] == "05-lower_experts.txt"
    assert "foe.experts_swiglu" in (tmp_path / "05-lower_experts.txt").read_text()
    assert "foe.experts_swiglu" not in (tmp_path / "00-captured.txt").read_text()


def test_bad_backend_options():
    model = builtin_model("olmoe-tiny")
    with pytest.raises(Exception, match="unknown foe backend option"):
        torch.compile(model, backend="foe", options={"groups": 2})(tokens(1, 4), use_cache=False)


@torch.no_grad()
def test_generic_model_through_convert():
    torch.manual_seed(1)
    model = UserMoETransformer(DenseLoopMoE)
    ids = tokens(2, 7, vocab=96)
    gm, report = convert(model, mode="exact", calibration_inputs=ids)
    assert report.exact and report.num_groups == 2 and len(report.layers) == 2
    assert report.logits_max_rel_error <= EXACT_MAX_REL
    assert max_rel(gm(ids), model(ids)) <= EXACT_MAX_REL
    with pytest.raises(ValueError, match="needs calibration_inputs"):
        convert(model, mode="exact")
