"""What convert() needs to know about each supported Hugging Face MoE family.

Every family here follows the transformers v5 layout: `model.model.layers[i]` holds
`self_attn` (q/k/v/o projections), `input_layernorm`, `post_attention_layernorm` and `mlp`,
an MoE block with `gate` (router weight [E, d]) and `experts` (gate_up_proj [E, 2I, d],
gate rows first; down_proj [E, d, I]), or a dense SwiGLU MLP on some Qwen layers.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal

from torch import nn

QKNorm = Literal["none", "per_head", "full_width"]


@dataclass(frozen=True)
class Family:
    model_type: str
    qk_norm: QKNorm  # Qwen3: per head (splits freely); OLMoE: spans all heads
    has_shared_expert: bool  # Qwen2-MoE: shared expert with a sigmoid gate
    num_experts_attr: str

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_attr))

    def renormalize(self, config) -> bool:
        """Whether the top-k routing weights are renormalised to sum to one."""
        return True if self.model_type == "mixtral" else bool(config.norm_topk_prob)


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", "none", False, "num_local_experts"),
    "qwen2_moe": Family("qwen2_moe", "none", True, "num_experts"),
    "qwen3_moe": Family("qwen3_moe", "per_head", False, "num_experts"),
    "olmoe": Family("olmoe", "full_width", False, "num_experts"),
}


def is_supported_family(model: nn.Module) -> bool:
    """A Hugging Face causal LM of a family above; anything else goes through the FX path."""
    return getattr(getattr(model, "config", None), "model_type", None) in FAMILIES


def family_of(model: nn.Module) -> Family:
    """The Family of a Hugging Face causal LM, or a ValueError listing the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(
            f"convert() got {type(model).__name__} (model_type={model_type!r}), which is not a supported "
            f"Hugging Face MoE causal LM; supported model types: {sorted(FAMILIES)}. "
            "Other MoE models go through the FX path (torch.compile(model, backend='foe'))."
        )
    return FAMILIES[model_type]


def is_moe_block(mlp: nn.Module) -> bool:
    return hasattr(mlp, "gate") and hasattr(mlp, "experts") and hasattr(mlp.experts, "gate_up_proj")


def source_function(module: nn.Module, name: str) -> Callable:
    """A helper (e.g. apply_rotary_pos_emb) from the module's own modeling file, for exactness."""
    return getattr(inspect.getmodule(type(module)), name)
