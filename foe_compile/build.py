"""Swap a Hugging Face model's decoder layers for their FoE or exact form, per instance."""
from __future__ import annotations

from torch import nn

from .config import FoEConfig
from .families import Family
from .models import ExactDecoderLayer, FoEAttention, FoEDecoderLayer, FoEDenseMLP, FoEMoE
from .models.group_streams import attention_scale
from .shape import ModelShape


def replace_layers(model: nn.Module, family: Family, shape: ModelShape, config: FoEConfig) -> None:
    """Replace model.model.layers[i] in place; weights stay views of the source's (zero-copy)."""
    H = config.num_groups
    layers = model.model.layers
    for i, source in enumerate(layers):
        attention = FoEAttention(source.self_attn, H, family)
        if i in shape.moe_layers:
            mlp: nn.Module = FoEMoE(source.mlp, config.layer_assignments[i], H, shape.top_k,
                                    family.renormalize(model.config), quota=config.mode == "foe")
        else:
            mlp = FoEDenseMLP(source.mlp, H)
        if config.mode == "exact":
            layers[i] = ExactDecoderLayer(source, attention, mlp)
        else:
            layers[i] = FoEDecoderLayer(source, attention, mlp,
                                        attn_stream_scale=attention_scale(config.attn_stream_scale, H),
                                        is_first=i == 0, is_last=i == shape.num_layers - 1)
