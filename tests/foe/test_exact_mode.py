"""Exact mode reproduces the source model: logits, KV-cached decoding, greedy generate()."""
import torch
from foe_testing import EXACT_MAX_REL, fresh_copy, max_rel, tokens

from foe_compile import convert


@torch.no_grad()
def test_exact_logits_equal_source(source, family_name):
    ids = tokens(2, 13)
    model, report = convert(fresh_copy(source), mode="exact", calibration_inputs=ids)
    assert report.exact and report.num_groups > 1
    assert max_rel(model(ids).logits, source(ids).logits) <= EXACT_MAX_REL
    assert report.logits_max_rel_error <= EXACT_MAX_REL


@torch.no_grad()
def test_exact_kv_cache_decode_equals_source(source):
    model, _ = convert(fresh_copy(source), mode="exact")
    ids = tokens(2, 6, seed=1)
    out_src, out_foe = source(ids, use_cache=True), model(ids, use_cache=True)
    cache_src, cache_foe = out_src.past_key_values, out_foe.past_key_values
    for step in range(4):
        nxt = out_src.logits[:, -1:].argmax(-1)
        out_src = source(nxt, past_key_values=cache_src, use_cache=True)
        out_foe = model(nxt, past_key_values=cache_foe, use_cache=True)
        assert max_rel(out_foe.logits, out_src.logits) <= EXACT_MAX_REL, f"decode step {step}"
    assert cache_foe.get_seq_length() == 6 + 4


@torch.no_grad()
def test_exact_greedy_generate_identical_tokens(source):
    model, _ = convert(fresh_copy(source), mode="exact")
    ids = tokens(2, 5, seed=2)
    expected = source.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


@torch.no_grad()
def test_foe_cached_decode_matches_its_own_full_forward(source):
    """FoE mode's group-local KV caches: decoding token by token equals one full forward."""
    model, _ = convert(fresh_copy(source), mode="foe")
    ids = tokens(1, 9, seed=3)
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 9):
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert max_rel(torch.cat(steps, 1), full) <= EXACT_MAX_REL


@torch.no_grad()
def test_single_group_foe_is_exact(source):
    model, report = convert(fresh_copy(source), mode="foe", num_groups=1)
    ids = tokens(1, 7)
    assert report.exact
    assert max_rel(model(ids).logits, source(ids).logits) <= EXACT_MAX_REL


@torch.no_grad()
def test_module_level_experts_keep_their_gelu_activation():
    """OLMoE with GELU or GELU-tanh experts (the issue's example: SiLU was computed regardless) converts
    exactly at module level, KV cache included; an activation foe::experts_swiglu lacks is refused."""
    import pytest
    from transformers import OlmoeConfig, OlmoeForCausalLM

    for act in ("gelu", "gelu_pytorch_tanh", "relu"):
        config = OlmoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, vocab_size=128,
                             hidden_act=act, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        source = OlmoeForCausalLM(config).eval()
        if act == "relu":
            with pytest.raises(ValueError, match="activation is ReLU"):
                convert(source, mode="exact")
            continue
        model, report = convert(source, mode="exact")
        assert report.exact, act
        ids = tokens(2, 6, vocab=128)
        assert max_rel(model(ids).logits, source(ids).logits) <= EXACT_MAX_REL
        out_src, out = source(ids, use_cache=True), model(ids, use_cache=True)
        nxt = out_src.logits[:, -1:].argmax(-1)
        step_src = source(nxt, past_key_values=out_src.past_key_values, use_cache=True)
        step = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        assert max_rel(step.logits, step_src.logits) <= EXACT_MAX_REL
