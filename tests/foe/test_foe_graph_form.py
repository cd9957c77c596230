"""The FoE form built by the FX passes (quota routing + one residual stream per group): against a
from-scratch reference of DESIGN.md's equations for a user-written model, and against the
module-level conversion for the Hugging Face families whose layers the two build alike."""
import copy

import pytest
import torch
import torch.nn.functional as F
from foe_testing import EXACT_MAX_REL, max_rel, tokens
from user_models import DenseLoopMoE, IndexAddLoopMoE, SwiGLU, UserMoETransformer

import foe_compile
from foe_compile import builtin_model, convert
from foe_compile.builtin import TINY
from foe_compile.capture import export_aten
from foe_compile.config import FoEConfig
from foe_compile.generic import convert_generic
from foe_compile.kernels.reference import route as quota_top_k
from foe_compile.passes import run_passes
from foe_compile.passes.expert_unit import GATE_ACTIVATIONS
from foe_compile.passes.infra import cleanup
from foe_compile.passes.matches import DENSE_KEY
from foe_compile.passes.partition_groups import GROUPS_KEY
from foe_compile.passes.split_dense_mlps import split_dense_mlps


def count(gm, name: str) -> int:
    return sum(name in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def foe_reference(model: UserMoETransformer, ids: torch.Tensor, H: int, c: float, renormalize: bool,
                  perm: list[int] | None = None) -> torch.Tensor:
    """DESIGN.md's per-layer equations written out for UserMoETransformer, state (r, m_1..m_H);
    group h owns experts perm[h*E/H:(h+1)*E/H]."""
    r = model.embed(ids)
    m = torch.zeros(H, *r.shape)
    for block in model.blocks:
        B, T, d = r.shape
        heads, hd = block.heads, block.head_dim
        rep, per_group = heads // block.kv_heads, heads // H
        partials = []
        for h in range(H):  # group h: its own stream in, its own heads out
            x = block.norm1(r + c * m[h])
            q = block.q(x).view(B, T, heads, hd).transpose(1, 2)
            k = block.k(x).view(B, T, block.kv_heads, hd).transpose(1, 2).repeat_interleave(rep, 1)
            v = block.v(x).view(B, T, block.kv_heads, hd).transpose(1, 2).repeat_interleave(rep, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, h * per_group:(h + 1) * per_group]
            cols = slice(h * per_group * hd, (h + 1) * per_group * hd)
            partial = H * F.linear(a.transpose(1, 2).reshape(B, T, -1), block.o.weight[:, cols])
            partials.append(partial if block.o.bias is None else partial + block.o.bias)  # bias once after the mean
        r = torch.stack([r + H * m[h] + partials[h] for h in range(H)]).mean(0)  # the one all-reduce
        xn = block.norm2(r).reshape(B * T, d)
        E = len(block.moe.experts)
        order = torch.arange(E) if perm is None else torch.tensor(perm)
        probs = block.moe.router(xn).softmax(-1)[:, order]  # position j holds expert order[j]
        weights, picked = quota_top_k(probs, H, block.moe.top_k)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        m = torch.zeros(H, B * T, d)
        for t in range(B * T):
            for j, position in enumerate(picked[t].tolist()):
                m[position // (E // H), t] += weights[t, j] * block.moe.experts[order[position]](xn[t])
        m = m.view(H, B, T, d)
    return model.head(model.norm(r + m.sum(0)))


@torch.no_grad()
@pytest.mark.parametrize("moe_cls, renormalize", [(DenseLoopMoE, True), (IndexAddLoopMoE, False)])
@pytest.mark.parametrize("c", [None, 1.0])
def test_user_model_foe_form_equals_the_equations(moe_cls, renormalize, c):
    torch.manual_seed(0)
    model = UserMoETransformer(moe_cls, layers=3, heads=4, kv_heads=2, experts=6, top_k=4).eval()
    ids = tokens(2, 7, vocab=96)
    gm, report = convert(model, mode="foe", attn_stream_scale=c, calibration_inputs=ids)
    expected = foe_reference(model, ids, H=2, c=2.0 if c is None else c, renormalize=renormalize)
    assert max_rel(gm(ids), expected) <= EXACT_MAX_REL
    assert report.mode == "foe" and report.num_groups == 2 and not report.exact
    assert [len(layer.reasons) for layer in report.layers] == [1, 2, 2]  # quota routing; + group streams
    assert "quota routing: top-2 in each of 2 blocks of 3 experts" in report.layers[0].reasons[0]
    assert report.logits_rel_error > 1e-3  # approximate, and measured
    assert all(0 < layer.routing_agreement < 1 and 0 < layer.prob_mass_kept <= 1 for layer in report.layers)
    passes = {r.name: r.rewrites for r in gm.meta["foe_pass_results"]}
    assert passes["split_group_streams"] == 2 and passes["fuse_sum_route_dispatch"] == 3
    assert passes["assign_experts"] == 0 and passes["split_dense_mlps"] == 0  # contiguous; no dense MLP
    assert count(gm, "aten.scaled_dot_product_attention") == 1 + 2 * 2  # layer 0 shared, then one per group


@torch.no_grad()
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("c", [None, 1.0])
def test_graph_form_equals_module_conversion(name, c):
    """Covers a dense layer (qwen3: layer 1), shared experts (qwen2) and q/k norms over all heads (olmoe)."""
    model = builtin_model(name)
    ids = tokens(2, 9)
    gm = export_aten(model, (ids,), {"use_cache": False}).module()
    results = {r.name: r.rewrites for r in run_passes(gm, mode="foe", attn_stream_scale=c)}
    converted, report = convert(copy.deepcopy(model), mode="foe", attn_stream_scale=c)
    expected = converted(ids, use_cache=False).logits
    assert max_rel(gm(ids, use_cache=False).logits, expected) <= EXACT_MAX_REL
    assert max_rel(expected, model(ids, use_cache=False).logits) > 1e-3  # the FoE form is not the source
    moe_layers = sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    assert results["split_group_streams"] == model.config.num_hidden_layers - 1
    assert results["split_dense_mlps"] == (model.config.num_hidden_layers - moe_layers) + (name == "qwen2-moe-tiny") * 3
    assert count(gm, "foe.sum_route_dispatch") == moe_layers
    (route,) = {n.args[5] for n in gm.graph.nodes if "sum_route_dispatch" in str(n.target)}
    assert route == report.num_groups  # quota routing in every fused op


@torch.no_grad()
@pytest.mark.parametrize("variant", [dict(heads=4, kv_heads=4, experts=8), dict(bias=True)], ids=["mha", "bias"])
def test_attention_variants_equal_the_equations(variant):
    """Multi-head attention (one KV head per query head) and biased q/k/v/o projections."""
    torch.manual_seed(0)
    model = UserMoETransformer(DenseLoopMoE, layers=2, **variant).eval()
    ids = tokens(2, 7, vocab=96)
    gm, _ = convert(model, mode="foe", num_groups=2, calibration_inputs=ids)
    assert max_rel(gm(ids), foe_reference(model, ids, H=2, c=2.0, renormalize=True)) <= EXACT_MAX_REL


class TypeAsRMSNorm(torch.nn.Module):
    """An RMSNorm scaled by 1 + w and cast back with output.type_as(x) (Gemma's and MiniMax-M3's)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (out * (1.0 + self.weight.float())).type_as(x)


@torch.no_grad()
def test_attention_norm_cast_back_with_type_as_equals_the_equations():
    """type_as(out, x) reads only x's dtype: the stream x is not put through a non-linear op there
    (before, such a norm was refused as a post-MLP norm, e.g. minimax_m3_vl_text's)."""
    torch.manual_seed(0)
    model = UserMoETransformer(DenseLoopMoE, layers=3).eval()
    for block in model.blocks:
        block.norm1 = TypeAsRMSNorm(32)
    ids = tokens(2, 7, vocab=96)
    gm, _ = convert(model, mode="foe", calibration_inputs=ids)
    assert {r.name: r.rewrites for r in gm.meta["foe_pass_results"]}["split_group_streams"] == 2
    assert max_rel(gm(ids), foe_reference(model, ids, H=2, c=2.0, renormalize=True)) <= EXACT_MAX_REL


@torch.no_grad()
def test_explicit_assignment_equals_the_equations():
    torch.manual_seed(0)
    model = UserMoETransformer(DenseLoopMoE, layers=2, experts=6, top_k=2).eval()
    ids, perm = tokens(2, 7, vocab=96), [4, 0, 2, 5, 1, 3]
    gm, report = convert(model, mode="foe", expert_assignment=perm, calibration_inputs=ids)
    assert report.expert_assignment == "explicit" and gm.meta["foe_expert_assignments"] == [perm, perm]
    assert max_rel(gm(ids), foe_reference(model, ids, H=2, c=2.0, renormalize=True, perm=perm)) <= EXACT_MAX_REL
    assert max_rel(gm(ids), foe_reference(model, ids, H=2, c=2.0, renormalize=True)) > 1e-3  # it did move experts
    copies = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("foe_assigned")]
    assert copies == ["foe_assigned_router_0", "foe_assigned_router_1"]  # per-expert weights: restacked, not copied


@torch.no_grad()
@pytest.mark.parametrize("assignment", ["calibrated", [7, 1, 5, 3, 0, 6, 2, 4]])
def test_assignment_equals_module_conversion(assignment):
    """grouped_mm weights (module attributes) become permuted copies; calibrated picks the same groups."""
    model = builtin_model("olmoe-tiny")
    ids = tokens(4, 16)
    gm, report = convert_generic(model, FoEConfig(mode="foe", expert_assignment=assignment), [ids])
    converted, expected = convert(copy.deepcopy(model), mode="foe", expert_assignment=assignment,
                                  calibration_inputs=ids)
    stats = [value for layer in report.layers for value in (layer.routing_agreement, layer.prob_mass_kept)]
    assert stats == pytest.approx([v for layer in expected.layers for v in (layer.routing_agreement, layer.prob_mass_kept)])
    layer_perms = converted.foe_config.layer_assignments
    assert gm.meta["foe_expert_assignments"] == [layer_perms[i] for i in sorted(layer_perms)]
    assert max_rel(gm(ids).logits, converted(ids, use_cache=False).logits) <= EXACT_MAX_REL
    assert sum(n.target.startswith("foe_assigned") for n in gm.graph.nodes if n.op == "get_attr") == 3 * 3


@torch.no_grad()
def test_fx_report_layers_equal_the_module_conversion():
    """Per layer (attention + MLP; qwen3-moe-tiny's layer 1 is dense): kind, exactness, reasons, agreement."""
    model = builtin_model("qwen3-moe-tiny")
    ids = tokens(2, 8)
    _, report = convert_generic(model, FoEConfig(mode="foe"), [ids])
    _, expected = convert(copy.deepcopy(model), mode="foe", calibration_inputs=ids)
    summary = lambda r: [(layer.kind, layer.exact, layer.reasons, layer.routing_agreement)  # noqa: E731
                         for layer in r.layers]
    assert summary(report) == summary(expected)
    assert [layer.kind for layer in report.layers] == ["moe", "dense", "moe"]


@torch.no_grad()
def test_one_layer_has_no_stream_to_split():
    """Quota routing still applies; the last (here: only) layer ends with the mean over groups."""
    torch.manual_seed(0)
    model = UserMoETransformer(DenseLoopMoE, layers=1, experts=6, top_k=2).eval()
    ids = tokens(2, 7, vocab=96)
    gm, _ = convert(model, mode="foe", calibration_inputs=ids)
    assert {r.name: r.rewrites for r in gm.meta["foe_pass_results"]}["split_group_streams"] == 0
    assert max_rel(gm(ids), foe_reference(model, ids, H=2, c=2.0, renormalize=True)) <= EXACT_MAX_REL


@torch.no_grad()
def test_single_group_foe_form_is_the_source():
    torch.manual_seed(0)
    model = UserMoETransformer(DenseLoopMoE)
    ids = tokens(2, 7, vocab=96)
    gm, report = convert(model, mode="foe", num_groups=1, calibration_inputs=ids)
    assert report.exact and max_rel(gm(ids), model(ids)) <= EXACT_MAX_REL
    assert all(layer.routing_agreement == layer.prob_mass_kept == 1.0 for layer in report.layers)
    assert {r.name: r.rewrites for r in gm.meta["foe_pass_results"]}["split_group_streams"] == 0


@torch.no_grad()
def test_exact_mode_never_splits_streams():
    model = builtin_model("qwen3-moe-tiny")
    gm = export_aten(model, (tokens(1, 5),), {"use_cache": False}).module()
    names = [r.name for r in run_passes(gm, mode="exact")]
    assert "split_group_streams" not in names and "split_dense_mlps" not in names
    assert count(gm, "aten.scaled_dot_product_attention") == model.config.num_hidden_layers
    (route,) = {n.args[5] for n in gm.graph.nodes if "sum_route_dispatch" in str(n.target)}
    assert route == 1  # global top-k


def test_foe_form_errors():
    torch.manual_seed(0)
    ids = tokens(1, 5, vocab=96)
    model = UserMoETransformer(DenseLoopMoE, experts=6, top_k=3)
    with pytest.raises(ValueError, match=r"num_groups=2 does not divide the KV-head, expert and top-k counts"):
        convert(model, mode="foe", num_groups=2, calibration_inputs=ids)
    with pytest.raises(ValueError, match=r"attn_stream_scale must lie in \[1, H=2\], got 3"):
        convert(UserMoETransformer(DenseLoopMoE), mode="foe", attn_stream_scale=3.0, calibration_inputs=ids)
    with pytest.raises(ValueError, match="attn_stream_scale only applies to mode='foe'"):
        convert(UserMoETransformer(DenseLoopMoE), mode="exact", attn_stream_scale=1.0, calibration_inputs=ids)
    with pytest.raises(ValueError, match="only changes the FoE form"):
        convert(UserMoETransformer(DenseLoopMoE), mode="exact", expert_assignment="calibrated", calibration_inputs=ids)
    with pytest.raises(ValueError, match=r"must be a permutation of range\(6\)"):
        convert(UserMoETransformer(DenseLoopMoE), expert_assignment=[0, 1, 2], calibration_inputs=ids)


@pytest.mark.parametrize("variant, message", [
    (dict(without_attention=(1,)), "needs an attention between consecutive MoE/MLP blocks"),
    (dict(post_norm=True), "non-linear op to the MoE/MLP output .* before it joins the residual stream"),
])
def test_foe_form_refuses_graphs_without_a_defined_group_stream(variant, message):
    torch.manual_seed(0)
    model = UserMoETransformer(DenseLoopMoE, layers=3, **variant).eval()
    ids = tokens(2, 7, vocab=96)
    with pytest.raises(ValueError, match=message):
        convert(model, mode="foe", calibration_inputs=ids)
    exact, _ = convert(model, mode="exact", calibration_inputs=ids)  # the exact form still applies
    assert max_rel(exact(ids), model(ids)) <= EXACT_MAX_REL


@torch.no_grad()
def test_backend_foe_form_refuses_a_shared_kv_cache():
    """A compiled graph that writes the KV cache would store the shared stream's keys while the
    groups attend with their own: refused (use_cache=False works; module-level keeps per-group caches)."""
    torch._dynamo.reset()
    model = builtin_model("qwen3-moe-tiny")
    compiled = torch.compile(model, backend="foe", fullgraph=True, options={"mode": "foe", "compiler": "eager"})
    with pytest.raises(Exception, match="also used outside the attention .* KV cache"):
        compiled(tokens(1, 5), use_cache=True)
    torch._dynamo.reset()


def test_foe_form_needs_a_fusable_router_input():
    """A block whose router reads the raw stream (no norm of residual + attention) cannot route by quota."""
    model = torch.nn.Sequential(torch.nn.Identity(), DenseLoopMoE(32, 16, 4, 2))
    with pytest.raises(ValueError, match="the FoE form needs quota routing.*convert it with mode='exact'"):
        convert(model, mode="foe", num_groups=2, calibration_inputs=torch.randn(1, 5, 32))


@torch.no_grad()
@pytest.mark.parametrize("name, compiler", [(name, "eager") for name in TINY] + [("olmoe-tiny", "inductor")])
def test_backend_mode_option(name, compiler):
    """torch.compile(backend="foe", options={"mode": "foe"}) on an unconverted model == convert(mode="foe")."""
    torch._dynamo.reset()
    model = builtin_model(name)
    ids = tokens(2, 6)
    expected = convert(copy.deepcopy(model), mode="foe")[0](ids, use_cache=False).logits
    compiled = torch.compile(model, backend="foe", fullgraph=True, options={"mode": "foe", "compiler": compiler})
    assert max_rel(compiled(ids, use_cache=False).logits, expected) <= EXACT_MAX_REL
    assert {r.name: r.rewrites for r in foe_compile.backend.last_results}["split_group_streams"] == 2
    torch._dynamo.reset()


class BiasedSwiGLU(SwiGLU):
    def __init__(self, d: int, inner: int) -> None:
        super().__init__(d, inner)
        self.w2 = torch.nn.Linear(inner, d, bias=True)


class GatedMLP(SwiGLU):
    """w2(act(w1 x) * w3 x) with another gate activation."""

    def __init__(self, d: int, inner: int, act) -> None:
        super().__init__(d, inner)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


@torch.no_grad()
@pytest.mark.parametrize("mlp, groups, splits", [
    (SwiGLU(32, 24), 4, 1),
    (GatedMLP(32, 24, F.gelu), 4, 1),  # each share keeps the source's activation
    (GatedMLP(32, 24, lambda x: F.gelu(x, approximate="tanh")), 4, 1),
    (GatedMLP(32, 24, F.relu), 4, 1),
    (GatedMLP(32, 24, torch.tanh), 4, 0),  # not a gate activation split_dense_mlps knows
    (SwiGLU(32, 24), 1, 0),  # one group: nothing to split
    (SwiGLU(32, 18), 4, 0),  # 18 units do not split in 4
    (BiasedSwiGLU(32, 24), 4, 0),  # a bias would be added H times
])
def test_split_dense_mlps(mlp, groups, splits):
    x = torch.randn(2, 5, 32)
    gm = torch.export.export(mlp, (x,), strict=False).module()
    gm.meta[GROUPS_KEY] = groups
    result = split_dense_mlps(gm)
    cleanup(gm)
    assert result.rewrites == splits and len(gm.meta[DENSE_KEY]) == splits
    assert count(gm, "aten.linear") == (3 * groups if splits else 3) and count(gm, "aten.stack") == splits
    if splits:  # one activation per share, the source's (its numerics checked below)
        assert sum(n.op == "call_function" and n.target in GATE_ACTIVATIONS for n in gm.graph.nodes) == groups
    torch.testing.assert_close(gm(x), mlp(x), rtol=1e-6, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("moe_cls", [DenseLoopMoE, IndexAddLoopMoE])
@pytest.mark.parametrize("captured", [(2, 7), (1, 1)])
def test_converted_graph_runs_at_other_shapes(moe_cls, captured):
    """Batch and sequence stay symbolic, also when the capture inputs have size 1 there."""
    torch.manual_seed(0)
    model = UserMoETransformer(moe_cls, layers=2, experts=6, top_k=2).eval()
    exact, _ = convert(model, mode="exact", calibration_inputs=tokens(*captured, vocab=96))
    foe, _ = convert(model, mode="foe", calibration_inputs=tokens(*captured, vocab=96))
    for batch, length in [(3, 11), (1, 1), (4, 33)]:
        ids = tokens(batch, length, seed=batch, vocab=96)
        assert max_rel(exact(ids), model(ids)) <= EXACT_MAX_REL
        renormalize = moe_cls is DenseLoopMoE
        assert max_rel(foe(ids), foe_reference(model, ids, H=2, c=2.0, renormalize=renormalize)) <= EXACT_MAX_REL


@torch.no_grad()
@pytest.mark.parametrize("mode", ["exact", "foe"])
def test_backend_recompiles_for_new_lengths(mode):
    """A new sequence length makes Dynamo recompile once with symbolic sizes; capture and passes keep
    them symbolic, so that one graph serves every later length."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = builtin_model("mixtral-tiny")
    expected_model = convert(copy.deepcopy(model), mode="foe")[0] if mode == "foe" else model
    compiled = torch.compile(model, backend="foe", fullgraph=True, options={"mode": mode, "compiler": "eager"})
    for length in (5, 9, 13):
        ids = tokens(2, length, seed=length)
        expected = expected_model(ids, use_cache=False).logits
        assert max_rel(compiled(ids, use_cache=False).logits, expected) <= EXACT_MAX_REL
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # length 5, then any length
    torch._dynamo.reset()


@torch.no_grad()
def test_eager_attention_gets_the_same_foe_form_as_sdpa():
    """Eager attention (matmul, softmax, matmul: what gpt-oss's sinks and several sliding-window
    families use) is recognised like SDPA: the FoE forms of one model under the two attention
    implementations agree to fp32 rounding, and the SDPA one equals the module-level form
    (test above)."""
    source = builtin_model("qwen3-moe-tiny")
    forms = []
    for implementation in ("sdpa", "eager"):
        model = copy.deepcopy(source)
        model.config._attn_implementation = implementation
        for layer in model.model.layers:
            layer.self_attn.config._attn_implementation = implementation
        converted, report = convert_generic(model, FoEConfig(mode="foe"), [tokens(2, 7)])
        assert report.num_groups > 1
        ops = [str(n.target) for n in converted.graph.nodes]
        assert any("scaled_dot_product" in op for op in ops) == (implementation == "sdpa")
        forms.append(converted)
    ids = tokens(3, 5, seed=4)
    sdpa, eager = (form(ids).logits for form in forms)
    assert max_rel(eager, sdpa) <= EXACT_MAX_REL
