"""Capture of Hugging Face MoE families whose code torch.export cannot follow as the source is set
up, and of routers that pick experts without aten.topk.

- Experts dispatched through transformers' @use_experts_implementation and set to "eager" (a
  Python loop over the experts that were hit) are captured with transformers' "grouped_mm"
  implementation of the same experts; the user's setting is restored and the eager model stays
  the reference (capture.exportable_experts).
- Experts classes that loop over the experts that were hit without that decorator (DBRX's) are
  captured through a forward over every expert (exportable_experts.TRACEABLE_FORWARDS); the
  eager model stays the reference, so a substitute that drifted from its class is caught; Aria's
  grouped GEMM (slices at running sums read as Python ints) is captured split by the counts.
- Code that depends on tensor values in a way torch.export cannot record (a loop over nonzero(),
  a Python branch on a tensor value, a slice bound read from a tensor) is refused in one line that
  names the module, file:line and code, says why and what the user can do (capture.CaptureRefused):
  longcat_flash, qwen4_exp_text.
- A router that picks its k experts by successive argmax (PhiMoE's sparsemixer) is a graph-routed
  block: its routing stays as written and its experts are lowered (moe_router.is_pick_router).

Every conversion is checked against the eager model at [2, 7] and [1, 5] token ids (fp32, max
relative logit error <= 1e-5). The whole-family tests are marked `families` (make test-families).
"""
import pytest
import torch
import torch.nn.functional as F
from foe_testing import EXACT_MAX_REL, max_rel
from handwritten_moes import WhereIndexAdd
from torch import nn
from user_models import UserMoETransformer

from foe_compile import convert, exportable_experts, hf_zoo
from foe_compile.capture import CaptureRefused, Positional, capture_kwargs, data_dependent_reason, export_aten
from foe_compile.passes.find_moe_blocks import find_moe_blocks
from foe_compile.passes.matches import MOE_KEY
from foe_compile.passes.moe_router import is_pick_router, routing_size

SHAPES = [(2, 7), (1, 5)]


def tokens(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def run(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a Hugging Face model (without its KV cache), a ConvertedGraph or a plain module."""
    return logits(model(ids, use_cache=False) if hasattr(model, "config") else model(ids))


@torch.no_grad()
def assert_exact_at_two_shapes(model, converted, vocab: int) -> list[float]:
    errors = [max_rel(run(converted, ids), run(model, ids))
              for ids in (tokens(vocab, batch, length, seed=i) for i, (batch, length) in enumerate(SHAPES))]
    assert max(errors) <= EXACT_MAX_REL, errors
    return errors


def lowered_layers(report) -> list:
    """The report's MoE layers whose experts were lowered to foe::experts_swiglu (whole-model FX
    path or block by block: the notes say so either way)."""
    return [layer for layer in report.layers if layer.kind == "moe"
            and any("lowered to foe::experts_swiglu" in note for note in layer.notes)]


# --- refusals: one line naming the model code -----------------------------------------------------

class HitExpertsLoop(WhereIndexAdd):
    """transformers' eager experts: a Python loop over only the experts some token was routed to."""

    def forward(self, x):
        h = self.flat(x)
        w, ids = self.route(h)
        out = torch.zeros_like(h)
        hit = torch.greater(F.one_hot(ids, self.num_experts).sum(dim=(0, 1)), 0).nonzero()
        for e in hit:
            token, slot = torch.where(ids == e[0])
            out.index_add_(0, token, self.experts[int(e[0])](h[token]) * w[token, slot, None])
        return out.view_as(x)


class BranchOnValue(nn.Module):
    def forward(self, x):
        if (x > 0).sum() > 3:
            return x * 2
        return x


class SliceByValue(nn.Module):
    def forward(self, x, counts):
        out = torch.zeros_like(x)
        end = counts.cumsum(0)[0]
        out[0:end] = x[0:end] * 2
        return out


def test_loop_over_hit_experts_is_refused_in_one_line_naming_the_module():
    torch.manual_seed(0)
    model = UserMoETransformer(HitExpertsLoop, vocab=96, experts=4, top_k=2).eval()
    with pytest.raises(ValueError) as info:
        convert(model, mode="exact", calibration_inputs=tokens(96, 2, 7))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("torch.export cannot capture UserMoETransformer: HitExpertsLoop (")
    assert "test_family_capture.py:" in message and "`for e in hit:`" in message
    assert "loops over a tensor whose length depends on tensor values" in message
    assert "range(num_experts)" in message  # what the user can do
    assert "GuardOnDataDependentSymNode" in type(info.value.__cause__).__name__  # the torch error stays attached


def test_branch_and_slice_on_tensor_values_are_named():
    with pytest.raises(CaptureRefused, match=r"BranchOnValue \(.*`if \(x > 0\)\.sum\(\) > 3:`\) branches in Python "
                                             r"on a value computed from tensor values.*torch\.where"):
        export_aten(BranchOnValue(), (torch.randn(4, 3),), dynamic=True)
    with pytest.raises(CaptureRefused, match=r"SliceByValue \(.*`out\[0:end\] = x\[0:end\] \* 2`\) uses a value "
                                             r"computed from tensor values as a Python int"):
        export_aten(SliceByValue(), (torch.randn(4, 3), torch.tensor([2, 2])), dynamic=True)


def test_other_errors_are_not_explained_as_data_dependent():
    assert data_dependent_reason(RuntimeError("shape mismatch")) is None
    assert data_dependent_reason(ValueError("unsupported op")) is None


# --- experts set to transformers' eager implementation -----------------------------------------

@torch.no_grad()
def test_eager_experts_are_captured_through_grouped_mm_and_the_setting_is_restored():
    model = hf_zoo.tiny_model("phimoe", num_hidden_layers=1)
    model.set_experts_implementation("eager")
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(model.config.vocab_size, 2, 7))
    assert model.config._experts_implementation == "eager"  # the source model is as the user set it
    assert report.exact and len(lowered_layers(report)) == 1, report.to_table()
    assert_exact_at_two_shapes(model, converted, model.config.vocab_size)


@pytest.mark.families
@torch.no_grad()
def test_dbrx_experts_are_captured_over_every_expert_and_restored():
    model = hf_zoo.tiny_model("dbrx")
    experts = model.transformer.blocks[0].ffn.experts
    # 2 tokens x top-2 of 8 experts: at least half of the experts are hit by no token at capture.
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(model.config.vocab_size, 1, 2))
    assert "forward" not in experts.__dict__  # the substitute was the capture's only
    assert report.exact and len(lowered_layers(report)) == model.config.n_layers, report.to_table()
    assert_exact_at_two_shapes(model, converted, model.config.vocab_size)


@pytest.mark.families
@torch.no_grad()
def test_a_capture_substitute_that_drifted_from_its_class_is_caught(monkeypatch):
    key = ("transformers.models.dbrx.modeling_dbrx", "DbrxExperts")
    faithful = exportable_experts.TRACEABLE_FORWARDS[key]
    monkeypatch.setitem(exportable_experts.TRACEABLE_FORWARDS, key,
                        lambda self, h, ids, w: faithful(self, h, ids, w * 1.001))  # e.g. a renormalisation lost
    model = hf_zoo.tiny_model("dbrx")
    with pytest.raises(ValueError, match="capture of DbrxFFN already differs from the eager model"):
        convert(model, mode="exact", calibration_inputs=tokens(model.config.vocab_size, 2, 7))


# --- routers picking experts by successive argmax -------------------------------------------------

class SuccessiveArgmax(WhereIndexAdd):
    """Top-2 by two argmax picks (the second with the first masked out), weights from the softmax:
    PhiMoE's sparsemixer without its jitter masking."""

    def route(self, x):
        scores = self.router(x)
        first = scores.max(dim=-1, keepdim=True)[1]
        second = scores.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
        ids = torch.cat([first, second], dim=-1)
        return F.softmax(scores, dim=-1).gather(-1, ids), ids


class ArgmaxWithoutKeepdim(WhereIndexAdd):
    """Top-1 by argmax(dim=-1) without keepdim, unsqueezed afterwards: not anchored (ids are not
    the argmax itself), so the block is not found."""

    def route(self, x):
        scores = self.router(x)
        ids = scores.argmax(dim=-1).unsqueeze(-1)
        return F.softmax(scores, dim=-1).gather(-1, ids), ids


@torch.no_grad()
def test_successive_argmax_router_is_graph_routed_and_exact():
    torch.manual_seed(0)
    model = UserMoETransformer(SuccessiveArgmax, vocab=96, experts=4, top_k=2).eval()
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(96, 2, 7))
    assert report.exact and not report.untouched_blocks, report.to_table()
    assert [layer.kind for layer in report.layers] == ["moe", "moe"]
    assert all(any("successive argmax" in note for note in layer.notes) for layer in report.layers)
    assert sum("experts_swiglu" in str(n.target) for n in converted.graph.nodes) == 2
    assert_exact_at_two_shapes(model, converted, 96)


def test_pick_router_anchor_sizes_and_what_is_not_an_anchor():
    torch.manual_seed(0)
    moe = SuccessiveArgmax(16, 8, 4, 2).eval()
    gm = export_aten(moe, (torch.randn(2, 5, 16),)).module()
    anchors = [n for n in gm.graph.nodes if is_pick_router(n)]
    assert len(anchors) == 1 and routing_size(anchors[0]) == (2, 4)  # the concatenation, not its two slots
    find_moe_blocks(gm)
    assert [b.graph_routing is not None for b in gm.meta[MOE_KEY]] == [True]
    other = export_aten(ArgmaxWithoutKeepdim(16, 8, 4, 1).eval(), (torch.randn(2, 5, 16),)).module()
    assert not any(is_pick_router(n) for n in other.graph.nodes)


# --- whole families (make test-families) ---------------------------------------------------------
#
# The refusal is checked where it arises, torch.export's capture of the whole model (the FX path),
# and through convert() where the code in question is inside an MoE block (which every path
# captures); qwen4_exp's is in its sparse-attention indexer, outside the MoE blocks.

# family -> (fragments of the one-line refusal: module, model code, why; whether it is in an MoE block).
REFUSED = {
    "longcat_flash": (("LongcatFlashExperts (transformers/models/longcat_flash/modeling_longcat_flash.py:",
                       "`for expert_idx_tensor in expert_hit:`", "loops over a tensor"), True),
    "qwen4_exp_text": (("Qwen4ExpTextQSAIndexer (transformers/models/qwen4_exp/modeling_qwen4_exp.py:",
                        "`if num_complete_blocks > 0:`", "branches in Python"), False),
}


@pytest.mark.families
@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_family_whose_code_cannot_be_exported_is_refused_in_one_line(model_type):
    model = hf_zoo.tiny_model(model_type)
    ids = tokens(model.config.vocab_size, 2, 7)
    fragments, in_moe_block = REFUSED[model_type]
    with pytest.raises(CaptureRefused) as info:
        export_aten(Positional(model, capture_kwargs(model)), (ids,), dynamic=True)
    assert "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert "torch.export cannot record" in str(info.value) and "to convert the model, use" in str(info.value)
    if in_moe_block:
        with pytest.raises(ValueError) as info:
            convert(model, mode="exact", calibration_inputs=ids)
        assert "\n" not in str(info.value) and "torch.export cannot capture" in str(info.value)
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)


@pytest.mark.families
@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
@torch.no_grad()
def test_phimoe_converts_exactly(experts):
    model = hf_zoo.tiny_model("phimoe")
    model.set_experts_implementation(experts)
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(model.config.vocab_size, 2, 7))
    assert report.exact and not report.untouched_blocks, report.to_table()
    layers = lowered_layers(report)
    assert len(layers) == model.config.num_hidden_layers, report.to_table()
    assert all(any("successive argmax" in note for note in layer.notes) for layer in layers)
    assert_exact_at_two_shapes(model, converted, model.config.vocab_size)


@pytest.mark.families
@torch.no_grad()
def test_jetmoe_sort_split_experts_convert_and_its_attention_experts_are_named():
    """JetMoE: its MLP experts (sort + split, parallel GEMMs) are lowered; its mixture-of-attention
    routers are left as written, reported as top-ks inside attention modules."""
    model = hf_zoo.tiny_model("jetmoe")
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(model.config.vocab_size, 2, 7))
    assert report.exact and len(lowered_layers(report)) == model.config.num_hidden_layers, report.to_table()
    assert len(report.untouched_blocks) == model.config.num_hidden_layers
    assert all("is inside the attention module model.model.layers." in why for why in report.untouched_blocks)
    assert_exact_at_two_shapes(model, converted, model.config.vocab_size)
