"""Ahead-of-time export: ONNX files run in onnxruntime and AOTInductor packages equal the PyTorch
model they came from, at the capture shape and at others (batch and sequence stay symbolic)."""

import onnx
import onnxruntime as ort
import pytest
import torch
from foe_testing import EXACT_MAX_REL, max_rel, tokens
from user_models import IndexAddLoopMoE, UserMoETransformer

from foe_compile import builtin_model, convert
from foe_compile.export import load_aoti, to_aoti, to_onnx

SHAPES = [(2, 9), (3, 17), (1, 1)]


def run_onnx(path, ids: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
@pytest.mark.parametrize("name, mode, dtype, tolerance", [
    ("olmoe-tiny", "foe", torch.float32, EXACT_MAX_REL),
    ("qwen2-moe-tiny", "foe", torch.float32, EXACT_MAX_REL),
    ("mixtral-tiny", "exact", torch.float16, 5e-3),  # fp16 rounding; the experts accumulate in fp32 in ONNX
])
def test_onnx_of_converted_models(tmp_path, name, mode, dtype, tolerance):
    """olmoe: q/k norms over all heads; qwen2: shared experts and a dense layer; mixtral: E = 8, k = 2, fp16."""
    model, _ = convert(builtin_model(name, dtype=dtype), mode=mode)
    path = to_onnx(model, tokens(2, 9), tmp_path / f"{name}.onnx")
    proto = onnx.load(path)
    domains = {node.domain for node in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only: no custom-op library needed
    assert {"TopK", "ScatterND", "CumSum"} <= {node.op_type for node in proto.graph.node}
    for batch, length in SHAPES:
        ids = tokens(batch, length, seed=length)
        assert max_rel(run_onnx(path, ids).float(), logits(model, ids).float()) <= tolerance


@torch.no_grad()
def test_onnx_of_a_user_model_through_the_fx_path(tmp_path):
    torch.manual_seed(0)
    model = UserMoETransformer(IndexAddLoopMoE, experts=6, top_k=2).eval()
    graph, _ = convert(model, mode="foe", calibration_inputs=tokens(2, 7, vocab=96))
    path = to_onnx(graph, tokens(2, 7, vocab=96), tmp_path / "user.onnx")
    for batch, length in SHAPES:
        ids = tokens(batch, length, seed=length, vocab=96)
        assert max_rel(run_onnx(path, ids), graph(ids)) <= EXACT_MAX_REL


@torch.no_grad()
def test_onnx_of_a_graph_routed_block(tmp_path):
    """A group-limited router stays in the graph as written and its experts are lowered: the grouping
    lower_experts adds (group_by_expert) must translate to ONNX too."""
    from handwritten_routers import GroupLimited

    torch.manual_seed(0)
    model = UserMoETransformer(GroupLimited, experts=4, top_k=2).eval()
    graph, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7, vocab=96))
    assert report.exact and all("routing left as written" in " ".join(layer.notes) for layer in report.layers)
    path = to_onnx(graph, tokens(2, 7, vocab=96), tmp_path / "group_limited.onnx")
    for batch, length in SHAPES:
        ids = tokens(batch, length, seed=length, vocab=96)
        assert max_rel(run_onnx(path, ids), model(ids)) <= EXACT_MAX_REL


@torch.no_grad()
@pytest.mark.parametrize("unit", ["GeluGated", "BiasedExperts", "Relu2Experts", "ClampedGLUExperts", "CorrectedSigmoid",
                                  "BiasedRouter", "GroupLimitedTop2", "ExpertScaled", "SigmoidOfTopLogits",
                                  "DenseWeightedInput"])
def test_onnx_of_every_expert_unit(tmp_path, unit):
    """The ONNX lowering of foe::experts_swiglu spells out each unit (GELU erf, biases, ReLU², the
    clamped GLU with alpha, limit and up offset, gate/up reordered from interleaved columns, the routing
    weight on the input of Llama 4's dense experts, whose routing stays in the graph), and
    that of foe::sum_route_dispatch each routing variant (sigmoid + correction bias + scaling, router bias,
    group limit + renormalisation eps, clamped renormalisation + per-expert scale, sigmoid of the top logits)."""
    import handwritten_moes
    import handwritten_routers

    torch.manual_seed(0)
    model = UserMoETransformer(getattr(handwritten_moes, unit, None) or getattr(handwritten_routers, unit), experts=4, top_k=2).eval()
    graph, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7, vocab=96))
    assert report.exact and not report.untouched_blocks
    path = to_onnx(graph, tokens(2, 7, vocab=96), tmp_path / f"{unit}.onnx")
    for batch, length in SHAPES:
        ids = tokens(batch, length, seed=length, vocab=96)
        assert max_rel(run_onnx(path, ids), model(ids)) <= EXACT_MAX_REL


@torch.no_grad()
def test_aoti_package_of_a_converted_model(tmp_path):
    model, _ = convert(builtin_model("olmoe-tiny"), mode="foe")
    runner = load_aoti(to_aoti(model, tokens(2, 9), tmp_path / "olmoe.pt2"))
    for batch, length in SHAPES:
        ids = tokens(batch, length, seed=length)
        assert max_rel(runner(ids).logits, logits(model, ids)) <= EXACT_MAX_REL
