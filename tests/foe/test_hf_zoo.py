"""foe_compile.hf_zoo: the MoE families of the installed transformers and their tiny models."""
import pytest
import torch

from foe_compile import hf_zoo

KNOWN = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"}
# Diverse on purpose: plain GQA, MLA + dense first layer + sigmoid router, biased attention and
# experts with sinks, hybrid linear attention with offset norms, Mamba + attention.
DIVERSE = ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_next", "jamba"]


def test_moe_families_finds_the_known_families():
    families = hf_zoo.moe_families()
    assert KNOWN <= set(families)
    assert families == sorted(set(families))
    assert "llama" not in families and "qwen3" not in families  # dense families are not MoE


def test_multimodal_wrappers_are_measured_through_their_text_decoder():
    composite = hf_zoo.composite_moe_types()
    families = set(hf_zoo.moe_families())
    assert composite.get("llama4") == "llama4_text"
    assert all(text in families and wrapper not in families for wrapper, text in composite.items())


@pytest.mark.parametrize("model_type", DIVERSE)
def test_tiny_model_builds_small_and_runs_forward(model_type):
    model = hf_zoo.tiny_model(model_type, seed=0)
    config = model.config
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert config.hidden_size == hf_zoo.HIDDEN and config.vocab_size == hf_zoo.VOCAB
    assert config.num_hidden_layers <= 4
    experts = next(getattr(config, a) for a in hf_zoo.EXPERT_COUNT_ATTRS if getattr(config, a, None))
    assert 4 <= experts <= 8
    ids = torch.randint(0, hf_zoo.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (2, 7, hf_zoo.VOCAB)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_in_its_seed():
    ids = torch.randint(0, hf_zoo.VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (hf_zoo.tiny_model("mixtral", seed=s)(input_ids=ids).logits for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tiny_configs_keep_every_kind_of_layer():
    next_ = hf_zoo.tiny_config("qwen3_next")
    assert {"linear_attention", "full_attention"} <= set(next_.layer_types)
    ds = hf_zoo.tiny_config("deepseek_v3")
    assert 0 < ds.first_k_dense_replace < ds.num_hidden_layers  # a dense layer and MoE layers
    assert ds.num_key_value_heads == ds.num_attention_heads  # MLA: K/V expanded per query head
    assert ds.n_group > 1 and ds.topk_group < ds.n_group  # group-limited routing still limits
    for model_type in ("mixtral", "olmoe"):  # GQA also where the default config is MHA (OLMoE)
        config = hf_zoo.tiny_config(model_type)
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)


def test_cover_keeps_every_kind_in_order():
    assert hf_zoo._cover(["s"] * 5 + ["f"], 4) == ["s", "s", "s", "f"]
    assert hf_zoo._cover("M-M-M*-ME", 4) == "M-*E"
    assert hf_zoo._cover(["a", "b", "a", "b"], 4) == ["a", "b", "a", "b"]


def test_zero_initialised_parameters_are_randomised():
    gpt = hf_zoo.tiny_model("gpt_oss")
    biases = {n: p for n, p in gpt.named_parameters() if n.endswith("bias") or n.endswith("sinks")}
    assert any("experts.gate_up_proj_bias" in n for n in biases) and any("self_attn.sinks" in n for n in biases)
    assert all((p != 0).all() for p in biases.values()), [n for n, p in biases.items() if (p == 0).any()]

    ds = hf_zoo.tiny_model("deepseek_v3")
    correction = [t for n, t in list(ds.named_parameters()) + list(ds.named_buffers())
                  if n.endswith("e_score_correction_bias")]
    assert correction and all(t.std() > 0.01 for t in correction)

    # Norm weights: near 1 but not 1; Qwen3-Next's offset norms (weight applied as 1 + w): near 0 but not 0.
    norm = hf_zoo.tiny_model("mixtral").model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, torch.ones_like(norm)) and (norm - 1).abs().max() < 0.6
    offset = hf_zoo.tiny_model("qwen3_next").model.norm.weight
    assert (offset != 0).all() and offset.abs().max() < 0.6


def test_randomize_zero_init_leaves_trained_looking_weights_alone():
    layer = torch.nn.Linear(4, 3)
    layer.bias.data.zero_()
    before = layer.weight.clone()
    names = hf_zoo.randomize_zero_init(layer, seed=0)
    assert names == ["bias"] and torch.equal(layer.weight, before) and (layer.bias != 0).all()


def test_describe_names_attention_router_and_activation():
    assert hf_zoo.describe(hf_zoo.tiny_model("deepseek_v3")) == {
        "attention": "MLA", "router": "sigmoid (grouped, bias-corrected)", "experts_act": "silu"}
    gpt = hf_zoo.describe(hf_zoo.tiny_model("gpt_oss"))
    assert gpt["router"] == "softmax (router bias)" and gpt["experts_act"].startswith("silu (clamped GLU, limit 7.0")
    assert hf_zoo.describe(hf_zoo.tiny_model("qwen3_next"))["attention"] == "GQA (hybrid: linear_attention)"
    assert hf_zoo.describe(hf_zoo.tiny_model("mixtral"))["router"] == "softmax"


def test_unknown_model_type_is_a_value_error():
    with pytest.raises(ValueError, match="unknown model_type 'not_a_family'"):
        hf_zoo.tiny_config("not_a_family")
