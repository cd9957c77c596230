"""Each pass alone on a tiny captured graph: what it finds or rewrites, numerics before == after,
and a case where it must not fire."""
import copy

import pytest
import torch
from torch import nn
from user_models import DenseLoopMoE, IndexAddLoopMoE, SwiGLU, UserBlock

from foe_compile import builtin_model
from foe_compile.passes.find_gqa_attention import find_gqa_attention
from foe_compile.passes.find_moe_blocks import find_moe_blocks
from foe_compile.passes.fuse_sum_route_dispatch import fuse_sum_route_dispatch
from foe_compile.passes.infra import cleanup, keeps_values
from foe_compile.passes.lower_experts import lower_experts
from foe_compile.passes.matches import MOE_KEY, UNTOUCHED_KEY
from foe_compile.passes.partition_groups import partition_groups

torch.manual_seed(0)


def capture(module: nn.Module, *args):
    return torch.export.export(module, args, strict=False).module()


def targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def count(gm, name: str) -> int:
    return sum(name in t for t in targets(gm))


X = torch.randn(2, 5, 32)


class GeluExperts(nn.Module):
    """A router and top-k followed by non-gated GELU experts: not a supported pattern."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(32, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        w, ids = self.router(x).softmax(-1).topk(2, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (w * (ids == e)).sum(-1, keepdim=True) * torch.nn.functional.gelu(expert(x))
        return out


@pytest.mark.parametrize("module, kind, renormalize", [
    (DenseLoopMoE(32, 16, 6, 2), "dense_loop", True),
    (IndexAddLoopMoE(32, 16, 6, 2), "select_loop", False),
])
def test_find_moe_blocks_user_patterns(module, kind, renormalize):
    gm = capture(module, X)
    result = find_moe_blocks(gm)
    (match,) = gm.meta[MOE_KEY]
    assert result.rewrites == 1 and not any("foe" in t for t in targets(gm))
    assert (match.kind, match.top_k, match.num_experts, match.renormalize) == (kind, 2, 6, renormalize)
    assert len(match.per_expert) == 6


def test_find_moe_blocks_transformers_v5_grouped_mm():
    block = builtin_model("qwen3-moe-tiny").model.layers[0].mlp
    gm = capture(block, X.new_zeros(2, 5, 64).normal_())
    (match,) = gm.meta[MOE_KEY] if find_moe_blocks(gm).rewrites else [None]
    assert match.kind == "grouped_mm" and (match.top_k, match.num_experts, match.renormalize) == (4, 8, True)
    assert tuple(match.gate_up.meta["val"].shape) == (8, 64, 64)


def test_find_moe_blocks_must_not_fire_on_dense_mlp():
    gm = capture(SwiGLU(32, 16), X)
    assert find_moe_blocks(gm).rewrites == 0


def test_unrecognised_experts_are_left_with_a_reason():
    gm = capture(GeluExperts(), X)
    assert find_moe_blocks(gm).rewrites == 0 and gm.meta[MOE_KEY] == []
    ((router, why),) = gm.meta[UNTOUCHED_KEY]
    assert router == "router_weight" and "comes from gelu" in why, why


def test_find_gqa_attention():
    gm = capture(UserBlock(32, 4, 2, DenseLoopMoE(32, 16, 6, 2)), X)
    assert find_gqa_attention(gm).rewrites == 1
    (attn,) = gm.meta["foe_attention"]
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 2, 8)


def test_find_gqa_attention_must_not_fire_without_projections():
    class RawAttention(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 5, 8)
    assert find_gqa_attention(capture(RawAttention(), q, q, q)).rewrites == 0


def _run(gm, *passes):
    for p in passes:
        result = p(gm)
        if result.modified and not result.name.startswith("find_"):
            cleanup(gm)
    return result


def test_partition_groups_splits_o_proj_exactly():
    block = UserBlock(32, 4, 2, DenseLoopMoE(32, 16, 6, 2))
    gm = capture(block, X)
    before = gm(X)
    linears = count(gm, "aten.linear")
    result = _run(gm, find_moe_blocks, find_gqa_attention, partition_groups)
    assert result.rewrites == 1 and gm.meta["foe_num_groups"] == 2
    assert count(gm, "aten.linear") == linears + 1 and count(gm, "aten.stack") == 1
    torch.testing.assert_close(gm(X), before, rtol=1e-6, atol=1e-6)


def test_partition_groups_must_not_fire_without_moe():
    gm = capture(UserBlock(32, 4, 2, SwiGLU(32, 16)), X)
    assert _run(gm, find_moe_blocks, find_gqa_attention, partition_groups).rewrites == 0


def test_partition_rejects_invalid_group_count():
    gm = capture(UserBlock(32, 4, 2, DenseLoopMoE(32, 16, 6, 2)), X)
    _run(gm, find_moe_blocks, find_gqa_attention)
    with pytest.raises(ValueError, match=r"num_groups=4 does not divide.*valid: \[1, 2\]"):
        partition_groups(gm, 4)


def test_fuse_sum_route_dispatch():
    block = UserBlock(32, 4, 2, DenseLoopMoE(32, 16, 6, 2))
    gm = capture(block, X)
    before = gm(X)
    result = _run(gm, find_moe_blocks, find_gqa_attention, partition_groups, fuse_sum_route_dispatch)
    assert result.rewrites == 1
    assert count(gm, "foe.sum_route_dispatch") == 1
    assert count(gm, "aten.topk") == 0 and count(gm, "aten.softmax") == 0
    assert count(gm, "aten.rms_norm") == 1  # norm1 stays; norm2 is fused
    torch.testing.assert_close(gm(X), before, rtol=1e-6, atol=1e-6)


def test_fuse_must_not_fire_without_norm():
    gm = capture(DenseLoopMoE(32, 16, 6, 2), X)  # the router reads the raw input
    assert _run(gm, find_moe_blocks, fuse_sum_route_dispatch).rewrites == 0
    assert count(gm, "aten.topk") == 1


@pytest.mark.parametrize("module", [DenseLoopMoE(32, 16, 6, 2), IndexAddLoopMoE(32, 16, 6, 3)])
def test_lower_experts(module):
    gm = capture(module, X)
    before = gm(X)
    result = _run(gm, find_moe_blocks, lower_experts)
    assert result.rewrites == 1 and count(gm, "foe.experts_swiglu") == 1
    assert count(gm, "aten.silu") == 0 and count(gm, "index_add") == 0
    torch.testing.assert_close(gm(X), before, rtol=1e-6, atol=1e-6)


def test_lower_experts_with_groups_sums_group_partials():
    gm = capture(DenseLoopMoE(32, 16, 6, 2), X)
    before = gm(X)
    find_moe_blocks(gm)
    lower_experts(gm, num_groups=3)
    cleanup(gm)
    (node,) = [n for n in gm.graph.nodes if "experts_swiglu" in str(n.target)]
    assert node.args[7] == 3  # num_groups
    torch.testing.assert_close(gm(X), before, rtol=1e-6, atol=1e-6)


def test_lower_experts_dense_weighted_input():
    """Llama 4's dense experts: found under graph routing and lowered to one foe::experts_swiglu with the
    weight on the input; the dense bmms and the repeat are gone, the routing (top-k, scatter, sigmoid) stays."""
    from handwritten_routers import DenseWeightedInput

    gm = capture(DenseWeightedInput(32, 16, 6, 2), X)
    before = gm(X)
    find_moe_blocks(gm)
    (match,) = gm.meta[MOE_KEY]
    assert match.kind == "dense_weighted_input" and match.weight_input and match.graph_routing
    lower_experts(gm, num_groups=2)
    cleanup(gm)
    (node,) = [n for n in gm.graph.nodes if "experts_swiglu" in str(n.target)]
    assert node.args[7] == 2 and node.args[-1] is True  # num_groups, weight_input
    assert count(gm, "aten.bmm") == 0 and count(gm, "aten.repeat") == 0
    assert count(gm, "aten.topk") == count(gm, "aten.scatter") == count(gm, "aten.sigmoid") == 1
    torch.testing.assert_close(gm(X), before, rtol=1e-6, atol=1e-6)


def test_dense_weighted_input_must_not_fire_when_unpicked_experts_contribute():
    from handwritten_near_misses import DenseZeroFill

    gm = capture(DenseZeroFill(32, 16, 6, 2), X)
    code = copy.deepcopy(gm.code)
    find_moe_blocks(gm)
    assert not gm.meta[MOE_KEY] and "sigmoid" in gm.meta[UNTOUCHED_KEY][0][1]
    assert lower_experts(gm).rewrites == 0 and gm.code == code


def test_lower_experts_must_not_fire_without_matches():
    gm = capture(SwiGLU(32, 16), X)
    code = copy.deepcopy(gm.code)
    find_moe_blocks(gm)
    assert lower_experts(gm).rewrites == 0 and gm.code == code


@torch.no_grad()
def test_hf_decoder_layer_captured_with_export_and_fused():
    """A Hugging Face decoder layer (no KV cache) through torch.export, then the whole pipeline."""
    from foe_compile.capture import export_aten
    from foe_compile.passes import run_passes

    model = builtin_model("olmoe-tiny")
    layer = model.model.layers[0]
    x = torch.randn(1, 6, 64)
    positions = torch.arange(6)[None]
    rope = model.model.rotary_emb(x, positions)
    gm = export_aten(layer, (x,), {"position_embeddings": rope, "attention_mask": None}).module()
    before = gm(x, position_embeddings=rope, attention_mask=None)
    results = {r.name: r.rewrites for r in run_passes(gm)}
    assert results == {"find_moe_blocks": 1, "find_gqa_attention": 1, "partition_groups": 1,
                       "fuse_sum_route_dispatch": 1, "lower_experts": 1}
    assert count(gm, "foe.sum_route_dispatch") == 1 and count(gm, "foe.experts_swiglu") == 1
    torch.testing.assert_close(gm(x, position_embeddings=rope, attention_mask=None), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src, dst, keeps", [
    (torch.float32, torch.float32, True), (torch.float16, torch.float32, True), (torch.bfloat16, torch.float64, True),
    (torch.float32, torch.float16, False), (torch.float32, torch.bfloat16, False), (torch.bfloat16, torch.float16, False),
    (torch.float16, torch.bfloat16, False), (torch.int32, torch.float64, True), (torch.int64, torch.float32, False),
    (torch.int8, torch.float16, True), (torch.int32, torch.int64, True), (torch.int64, torch.int32, False),
    (torch.bool, torch.float16, True), (torch.float32, torch.int64, False), (torch.float32, torch.float8_e4m3fn, False),
])
def test_a_cast_is_skipped_by_matchers_only_when_it_keeps_every_value(src, dst, keeps):
    """infra.keeps_values agrees with a round trip of values at the edges of the source dtype."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    cast = graph.call_function(torch.ops.aten.to.dtype, (x, dst))
    x.meta["val"], cast.meta["val"] = torch.empty(0, dtype=src), torch.empty(0, dtype=dst)
    assert keeps_values(cast) is keeps
    if src.is_floating_point:
        info = torch.finfo(src)
        probe = torch.tensor([info.max, info.tiny, info.eps, 1 + info.eps, -info.max], dtype=src)
    elif src == torch.bool:
        probe = torch.tensor([True, False])
    else:
        info = torch.iinfo(src)
        probe = torch.tensor([info.max, info.min, info.max - 1], dtype=src)
    if keeps:
        assert torch.equal(probe.to(dst).to(src), probe)
    else:
        assert not torch.equal(probe.to(dst).to(src), probe)
