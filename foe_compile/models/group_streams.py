"""The FoE layer's residual-stream equations (DESIGN.md, "FoE semantics"), written once.

State between layers: the shared stream r_full [B, T, d] and m [n, B, T, d], group h's weighted
expert output (plus its share of split dense MLPs and shared experts), for n of the H groups;
group h's stream is r_full + H*m_h. One layer:
    streams_h = r_full + H*m_h                        group_streams: what group h adds to the mean
    a_h       = H * Attn_h(Norm1(r_full + c*m_h))     attention_inputs (c: attention_scale)
    r_full'   = mean_h(streams_h + a_h)               mean_over_groups: the one collective
    m'_h      = group h's quota-routed experts on Norm2(r_full')
The first layer starts from the embedding broadcast to every group (m = 0); after the last the
model's stream is mean_h(r_full + H*m_h) (final_mean).

Who computes from these functions:
  models/layer.py              the module form: foe_layer and final_mean, every group in one process
  distributed/foe_runtime.py   the ranks: foe_layer and final_mean with the all-reduce that turns a
                               rank's sum over its groups into the mean over all H
  passes/split_group_streams   the FX graph form: it keeps the source's shared residual r + sum_h m_h
                               (= mean_h(r + H*m_h), what the fused route op's mean needs) and emits
                               attention_share in place of the block output on group h's path to
                               its attention, so that attention reads r + c*m_h
  convert.py, build.py, generic.py  attention_scale: c's default and range, for layers and reports
ONNX and AOTInductor export trace the converted model, so they compute what these forms compute.
The exact form (one shared stream, two all-reduces) is not FoE's and is not defined here.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduceSum = Callable[[Tensor], Tensor]  # a rank's partial sum -> the sum over all ranks


def broadcast(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """The state before the first layer: every group's stream is the embedding x [B, T, d] (m = 0)."""
    return x, x.new_zeros(num_groups, *x.shape)


def attention_scale(attn_stream_scale: float | None, H: int) -> float:
    """c: FoEConfig.attn_stream_scale, or H (the paper's stream) when None; ValueError outside [1, H]."""
    c = float(H if attn_stream_scale is None else attn_stream_scale)
    if not 1 <= c <= H:
        raise ValueError(f"attn_stream_scale must lie in [1, H={H}], got {attn_stream_scale}")
    return c


def group_streams(r_full: Tensor, m: Tensor, H: int) -> Tensor:
    """r_full + H*m_h [n, B, T, d]: group h's stream, what it contributes to the mean."""
    return r_full + H * m


def attention_share(m: Tensor, c: float) -> Tensor:
    """c*m_h: what group h's attention reads of its own expert output, where the source reads sum_h m_h."""
    return c * m


def attention_inputs(r_full: Tensor, m: Tensor, streams: Tensor, H: int, c: float) -> Tensor:
    """r_full + c*m_h [n, B, T, d], group h's attention input (before Norm1); c = H is its stream."""
    return streams if c == H else r_full + attention_share(m, c)


def mean_over_groups(terms: Tensor, H: int, all_reduce_sum: AllReduceSum | None = None) -> Tensor:
    """mean_h terms[h]: a mean when every group is here, else the all-reduced sum of the local ones over H."""
    if all_reduce_sum is None:
        return terms.mean(0)
    return all_reduce_sum(terms.sum(0)) / H


def foe_layer(r_full: Tensor, m: Tensor, H: int, c: float, attend: Callable[[Tensor], Tensor],
              mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One layer on the state of n of the H groups -> the next state (r_full', m').

    attend: attention inputs [n, B, T, d] -> a_h = H * Attn_h(Norm1(.)) for each group;
    mix: (streams, a) -> (mean_over_groups(streams + a), m' = the groups' MLP outputs on Norm2 of it).
    """
    streams = group_streams(r_full, m, H)
    return mix(streams, attend(attention_inputs(r_full, m, streams, H, c)))


def final_mean(r_full: Tensor, m: Tensor, H: int, all_reduce_sum: AllReduceSum | None = None) -> Tensor:
    """The model's stream after the last layer: mean_h(r_full + H*m_h) [B, T, d]."""
    return mean_over_groups(group_streams(r_full, m, H), H, all_reduce_sum)


def pack_state(r_full: Tensor, m: Tensor) -> Tensor:
    """The state as one tensor [1 + H, B, T, d] = (r_full, m_1..m_H), how it travels between
    Hugging Face decoder layers (their signature passes one hidden-state tensor)."""
    return torch.cat([r_full.unsqueeze(0), m])


def unpack_state(state: Tensor) -> tuple[Tensor, Tensor]:
    """(r_full [B, T, d], m [H, B, T, d]) of a packed state."""
    return state[0], state[1:]


def stream_mean(state: Tensor) -> Tensor:
    """The model-level stream of a layer's output (output_hidden_states, calibration): a packed
    state's r_full + sum_h m_h (final_mean's mean_h(r_full + H*m_h) up to rounding), or the last
    layer's output [B, T, d] as it is."""
    if state.dim() == 3:
        return state
    r_full, m = unpack_state(state)
    return r_full + m.sum(0)
