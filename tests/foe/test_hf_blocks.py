"""Module-level exact conversion of Hugging Face families without FoE layer classes
(hf_blocks.py): the MoE blocks are rewritten in place, the model keeps its class, attention,
KV cache, generate(), optional outputs and save_pretrained. The sweep over every family is in
test_families.py; these are the behaviours around it, on gpt-oss (router bias, clamped GLU
with biases and interleaved gate/up columns: the hardest block of the zoo)."""
import pytest
import torch
from foe_testing import EXACT_MAX_REL, max_rel

import foe_compile
from foe_compile import convert, hf_blocks, hf_zoo


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt_oss():
    model = hf_zoo.tiny_model("gpt_oss")
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    return model, converted, report


@torch.no_grad()
def test_blocks_are_rewritten_and_the_source_is_left_alone(gpt_oss):
    model, converted, report = gpt_oss
    assert report.exact and not report.untouched_blocks, report.to_table()
    assert isinstance(converted, type(model)) and converted is not model
    blocks = hf_blocks.moe_blocks(converted)
    assert len(blocks) == model.config.num_hidden_layers
    assert all("_foe_block_graph" in b.__dict__ for _, b in blocks)
    assert not any("_foe_block_graph" in b.__dict__ for _, b in hf_blocks.moe_blocks(model))
    assert converted.state_dict().keys() == model.state_dict().keys()  # same names, same tensors
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(converted.parameters(), model.parameters()))
    ids = tokens(3, 4, seed=1)
    assert max_rel(converted(ids).logits, model(ids).logits) <= EXACT_MAX_REL


@torch.no_grad()
def test_save_and_load_round_trip(gpt_oss, tmp_path):
    model, converted, _ = gpt_oss
    converted.save_pretrained(tmp_path / "saved")
    plain = type(model).from_pretrained(tmp_path / "saved")  # the source class reads the source layout
    loaded = foe_compile.from_pretrained(tmp_path / "saved")
    assert all("_foe_block_graph" in b.__dict__ for _, b in hf_blocks.moe_blocks(loaded))
    ids = tokens(2, 5, seed=2)
    assert max_rel(plain(ids).logits, model(ids).logits) == 0
    assert max_rel(loaded(ids).logits, model(ids).logits) <= EXACT_MAX_REL


@torch.no_grad()
def test_router_logits_are_the_source_routers(gpt_oss):
    """transformers records router logits with hooks on the router modules: such a call runs the
    source blocks, so the logits (and the aux loss) are the source's."""
    model, converted, _ = gpt_oss
    ids = tokens(2, 5, seed=3)
    want, got = model(ids, output_router_logits=True), converted(ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) > 0
    assert all(torch.equal(g, w) for g, w in zip(got.router_logits, want.router_logits))
    assert torch.equal(got.logits, want.logits)


@torch.no_grad()
def test_inplace_and_already_converted():
    model = hf_zoo.tiny_model("gpt_oss")
    want = model(tokens(1, 6)).logits
    converted, report = convert(model, mode="exact", inplace=True)
    assert converted is model and report.exact
    assert max_rel(model(tokens(1, 6)).logits, want) <= EXACT_MAX_REL
    with pytest.raises(ValueError, match="already converted"):
        convert(model, mode="exact")


def test_blocks_are_found_by_structure():
    """An `experts` submodule marks a block; a decoder layer holding experts inline (Gemma 4) is
    not one, so that family takes the whole-model FX path."""
    assert [name for name, _ in hf_blocks.moe_blocks(hf_zoo.tiny_model("nemotron_h"))] == ["model.layers.1.mixer"]
    assert hf_blocks.moe_blocks(hf_zoo.tiny_model("gemma4_text")) == []


@torch.no_grad()
def test_blocks_that_cannot_be_captured_are_refused_once_with_the_reason():
    with pytest.raises(ValueError, match=r"layers\.0\.mlp, model\.layers\.1\.mlp: torch.export cannot capture "
                                         r"LongcatFlashMoE.*expert_hit"):
        convert(hf_zoo.tiny_model("longcat_flash"), mode="exact")


@torch.no_grad()
def test_a_dtype_move_runs_the_source_blocks_and_copies_are_refused():
    """The block graphs bake in the capture's dtype: after .to(bfloat16) the blocks run their source
    forward (still the model's computation) instead of failing; deep copies and pickles of a converted
    model are refused with what to do instead."""
    import copy
    import pickle

    converted, _ = convert(hf_zoo.tiny_model("gpt_oss"), mode="exact", calibration_inputs=tokens(2, 7))
    with pytest.raises(TypeError, match="deep-copy the source model"):
        copy.deepcopy(converted)
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(converted.model.layers[0].mlp.__dict__["_foe_block_graph"])
    source = hf_zoo.tiny_model("gpt_oss").to(torch.bfloat16)
    moved = converted.to(torch.bfloat16)
    ids = tokens(2, 7, seed=5)
    assert torch.equal(moved(ids).logits, source(ids).logits)


def test_report_rows_carry_the_decoder_layer_number():
    model = hf_zoo.tiny_model("nemotron_h")  # its one MoE block is layer 1's mixer
    _, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    assert [layer.index for layer in report.layers] == [1]


@torch.no_grad()
def test_a_fill_in_the_grouped_combine_that_is_not_the_sentinel_one_is_left_as_written(monkeypatch):
    """transformers' grouped_mm experts with one extra line (zero a row whose input is large): a
    masked_fill in the combine that is not the one zeroing sentinel ids must not be erased by lowering."""
    import inspect

    import transformers.integrations.moe as tm

    source = inspect.getsource(tm.grouped_mm_experts_forward)
    anchor = "    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)  # (S, hidden_dim)\n"
    assert anchor in source, "transformers changed grouped_mm_experts_forward; update this test"
    guard = ("    weighted_out = weighted_out.masked_fill(selected_hidden_states_g.abs().amax(-1, keepdim=True) > 100.0,"
             " 0.0)\n")
    namespace = dict(vars(tm))
    exec(source.replace(anchor, anchor + guard), namespace)  # noqa: S102 - the library's own code, one line added
    monkeypatch.setitem(tm.ALL_EXPERTS_FUNCTIONS._global_mapping, "grouped_mm", namespace["grouped_mm_experts_forward"])
    model = hf_zoo.tiny_model("gpt_oss")
    model.set_experts_implementation("grouped_mm")
    with pytest.raises(ValueError, match="masked_fill"):
        convert(model, mode="exact", calibration_inputs=tokens(2, 7))
