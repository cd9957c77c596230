"""Built-in model configs: tiny ones (random weights, offline, for tests and the demo) and the
public full-size shapes (for meta-device conversion and benchmarks). No downloads."""
from __future__ import annotations

import torch
from torch import nn
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

_TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, vocab_size=128,
             max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

BUILTIN = {
    # Tiny: every family's quirks, with H > 1 valid in FoE mode.
    "mixtral-tiny": (MixtralConfig, MixtralForCausalLM, dict(
        _TINY, num_key_value_heads=4, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2-moe-tiny": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(  # E=12: not a power of two
        _TINY, num_key_value_heads=4, moe_intermediate_size=32, num_experts=12, num_experts_per_tok=4,
        shared_expert_intermediate_size=48, intermediate_size=64, norm_topk_prob=False)),
    "qwen3-moe-tiny": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(  # layer 1 is dense
        _TINY, num_key_value_heads=4, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=4,
        intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[1])),
    "olmoe-tiny": (OlmoeConfig, OlmoeForCausalLM, dict(  # full-width q/k norm, clipped qkv
        _TINY, num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=False, clip_qkv=8.0)),
    # Full size (public configs), for the meta device.
    "mixtral-8x7b": (MixtralConfig, MixtralForCausalLM, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
    "qwen3-30b-a3b": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960)),
    "olmoe-1b-7b": (OlmoeConfig, OlmoeForCausalLM, dict(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304)),
    "qwen1.5-moe-a2.7b": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
        num_experts_per_tok=4, vocab_size=151936)),
}
TINY = [name for name in BUILTIN if name.endswith("-tiny")]


def _lookup(name: str):
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN)}")
    return BUILTIN[name]


def builtin_config(name: str, **overrides):
    config_cls, _, kwargs = _lookup(name)
    return config_cls(**{**kwargs, **overrides})


def builtin_model(name: str, *, seed: int = 0, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A random-weight model of a built-in config (full-size ones default to the meta device)."""
    _, model_cls, _ = _lookup(name)
    device = device if device is not None else ("cpu" if name in TINY else "meta")
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(builtin_config(name, **overrides))
    return model.to(dtype).eval()
