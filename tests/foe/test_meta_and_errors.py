"""Full-size configs on the meta device, and invalid requests."""
import time

import pytest
import torch
from foe_testing import fresh_copy, tokens
from transformers import LlamaConfig, LlamaForCausalLM

from foe_compile import FoEConfig, builtin_model, convert


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("name, groups, expected_h", [
    ("qwen3-30b-a3b", None, 4), ("olmoe-1b-7b", None, 8), ("mixtral-8x7b", 2, 2),
])
def test_meta_conversion_of_full_size_models(name, groups, expected_h):
    model = builtin_model(name)  # meta device
    rss = rss_bytes()
    start = time.perf_counter()
    model, report = convert(model, num_groups=groups)
    seconds = time.perf_counter() - start
    assert report.num_groups == expected_h
    assert all(p.device.type == "meta" for p in model.parameters())
    assert seconds < 10, f"meta conversion took {seconds:.1f} s"
    assert rss_bytes() - rss < 64 * 2**20, "meta conversion must not allocate real tensors"


def test_mixtral_with_eight_groups_is_rejected():
    with pytest.raises(ValueError, match=r"top-k=2 .*not divisible by H=8.*Valid num_groups: \[1, 2\]"):
        convert(builtin_model("mixtral-8x7b"), num_groups=8)


def test_olmoe_with_three_groups_is_rejected():
    with pytest.raises(ValueError, match=r"16 KV heads.*not divisible by H=3.*Valid num_groups: \[1, 2, 4, 8\]"):
        convert(builtin_model("olmoe-1b-7b"), num_groups=3)


def test_more_groups_than_kv_heads_is_rejected():
    with pytest.raises(ValueError, match=r"H=8 is larger than the 4 KV heads.*Valid num_groups: \[1, 2, 4\]"):
        convert(builtin_model("qwen3-30b-a3b"), num_groups=8)


def test_exact_mode_does_not_need_k_divisible():
    _, report = convert(builtin_model("mixtral-8x7b"), mode="exact", num_groups=8)
    # On the meta device nothing runs: exact by construction, but not measured, so not reported exact.
    assert report.num_groups == 8 and report.structurally_exact and not report.exact
    assert report.validation_error is None and "exact structure, unverified" in report.to_table()


def test_non_moe_model_is_rejected():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match=r"no MoE block found in LlamaForCausalLM.*families converted directly"):
        convert(LlamaForCausalLM(cfg), mode="exact", calibration_inputs=tokens(1, 4, vocab=64))


def test_bad_options_are_rejected(source):
    with pytest.raises(ValueError, match="unknown FoEConfig option"):
        convert(fresh_copy(source), groups=2)
    with pytest.raises(ValueError, match="mode must be"):
        convert(fresh_copy(source), mode="fast")
    with pytest.raises(ValueError, match="needs calibration_inputs"):
        convert(fresh_copy(source), expert_assignment="calibrated")
    with pytest.raises(ValueError, match="permutation of range"):
        convert(fresh_copy(source), expert_assignment=[0, 0, 1])
    with pytest.raises(ValueError, match=r"attn_stream_scale must lie in \[1, H="):
        convert(fresh_copy(source), attn_stream_scale=0.5)
    with pytest.raises(ValueError, match="integer token ids"):
        convert(fresh_copy(source), calibration_inputs=torch.zeros(2, 3))
    model, _ = convert(fresh_copy(source))
    with pytest.raises(ValueError, match="already converted"):
        convert(model)


def test_config_object_and_overrides_combine(source):
    model, report = convert(fresh_copy(source), FoEConfig(mode="exact"), num_groups=2)
    assert (report.mode, report.num_groups) == ("exact", 2)
    model(tokens(1, 3))
