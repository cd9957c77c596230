"""Decoder layers in the two converted forms; both keep the Hugging Face layer signature so the
source model's own forward, masks, cache and generate() drive them unchanged.

exact: one shared stream x [B, T, d]
    r  = x + mean_h(H * Attn_h(Norm1(x)))            # all-reduce 1
    x' = r + sum_h m_h(Norm2(r))                      # all-reduce 2 (global top-k)
foe: the equations of group_streams.py (foe_layer, final_mean), every group in this process;
between FoE layers the state travels packed, [1 + H, B, T, d] = (r_full, m_1..m_H).
"""
from __future__ import annotations

from torch import Tensor, nn

from .attention import FoEAttention
from .group_streams import broadcast, final_mean, foe_layer, mean_over_groups, pack_state, unpack_state
from .moe import FoEMoE


class GroupedDecoderLayer(nn.Module):
    """What both forms hold: the source's norms (shared), group attention and the split MLP."""

    def __init__(self, source_layer: nn.Module, attention: FoEAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = source_layer.input_layernorm
        self.post_attention_layernorm = source_layer.post_attention_layernorm
        self.self_attn = attention
        self.mlp = mlp
        self.num_groups = len(attention.groups)


class ExactDecoderLayer(GroupedDecoderLayer):

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids=None,
                past_key_values=None, use_cache: bool | None = False, position_embeddings=None, **kwargs) -> Tensor:
        H = self.num_groups
        normed = self.input_layernorm(hidden_states).expand(H, *hidden_states.shape)
        attn = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
        r, m = mix_and_mlp(self.mlp, self.post_attention_layernorm, hidden_states.unsqueeze(0), attn)
        return r + m.sum(0)  # the second all-reduce


class FoEDecoderLayer(GroupedDecoderLayer):
    def __init__(self, source_layer: nn.Module, attention: FoEAttention, mlp: nn.Module, *,
                 attn_stream_scale: float, is_first: bool, is_last: bool) -> None:
        super().__init__(source_layer, attention, mlp)
        self.attn_stream_scale = attn_stream_scale
        self.is_first, self.is_last = is_first, is_last

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids=None,
                past_key_values=None, use_cache: bool | None = False, position_embeddings=None, **kwargs) -> Tensor:
        H = self.num_groups
        r_full, m = broadcast(hidden_states, H) if self.is_first else unpack_state(hidden_states)

        def attend(x: Tensor) -> Tensor:
            return self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, past_key_values,
                                  **kwargs)

        def mix(streams: Tensor, attn: Tensor) -> tuple[Tensor, Tensor]:
            return mix_and_mlp(self.mlp, self.post_attention_layernorm, streams, attn)

        r_full, m = foe_layer(r_full, m, H, self.attn_stream_scale, attend, mix)
        return final_mean(r_full, m, H) if self.is_last else pack_state(r_full, m)


def mix_and_mlp(mlp: nn.Module, norm: nn.Module, residual: Tensor, partials: Tensor) -> tuple[Tensor, Tensor]:
    """r = mean_h(residual + partials) (the all-reduce), then the MLP on Norm2(r).

    residual [1 or H, B, T, d], partials [H, B, T, d] -> (r [B, T, d], m [H, B, T, d]).
    MoE layers fuse mean + norm + routing + dispatch into foe::sum_route_dispatch.
    """
    H, shape = partials.shape[0], partials.shape[1:]
    if isinstance(mlp, FoEMoE):
        d = shape[-1]
        r, xn, ids, weights, pairs, offsets = mlp.route(residual.reshape(residual.shape[0], -1, d),
                                                        partials.reshape(H, -1, d), norm)
        m = mlp(xn, ids, weights, pairs, offsets)
        return r.view(shape), m.view(H, *shape)
    r = mean_over_groups(residual + partials, H)
    return r, mlp(norm(r))

