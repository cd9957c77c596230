"""The FoE runtime: each rank runs its groups of a converted model; one all-reduce per layer.

Per layer, on a rank holding local groups L (state: r_full [B, T, d], m [|L|, B, T, d]):
    streams_h = r_full + H*m_h;  attn_h = H * Attn_h(Norm1(r_full + c*m_h))   (h in L)
    r_full'   = all_reduce_sum(sum_{h in L} streams_h + attn_h) / H           # the ONE collective
    m'_h      = group h's quota-routed experts on Norm2(r_full')              (group-local)
After the last layer: out = all_reduce_sum(sum_{h in L} r_full + H*m_h) / H (the final mean,
once per forward, kind "final_mean"). OLMoE adds a tiny [B, T, 2] all-reduce per layer for its
full-width q/k norm (kind "qk_norm"). With G > H ranks (mesh.py), each rank also runs its
group's intra-group dispatch/combine (dispatch.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import FoEConfig
from ..convert import convert
from ..models import FoEDecoderLayer
from .accounting import FINAL
from .attention import KVCache, LocalAttention
from .base import RankModel
from .mesh import FoEMesh
from .moe import LocalMLP

State = tuple[Tensor, Tensor]  # (r_full [B, T, d], m [n_local, B, T, d])


class FoERankLayer(nn.Module):
    def __init__(self, index: int, layer: FoEDecoderLayer, mesh: FoEMesh, device: torch.device) -> None:
        super().__init__()
        self.index, self.ring = index, mesh.ring
        self.H = layer.num_groups
        self.c = layer.attn_stream_scale
        self.input_layernorm = layer.input_layernorm.to(device)
        self.post_attention_layernorm = layer.post_attention_layernorm.to(device)
        reduce = lambda t: self.ring.all_reduce(t, layer=index, kind="qk_norm")  # noqa: E731
        self.self_attn = LocalAttention(layer.self_attn, mesh.local_groups, float(self.H), reduce, device)
        self.mlp = LocalMLP(layer.mlp, mesh.local_groups, device, intra=mesh.group, layer=index)

    def forward(self, state: State, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None) -> State:
        r_full, m = state
        H = self.H
        streams = r_full + H * m
        attn_in = streams if self.c == H else r_full + self.c * m
        attn = self.self_attn(self.input_layernorm(attn_in), rope, mask, cache)
        partial = (streams + attn).sum(0)
        r_full = self.ring.all_reduce(partial, layer=self.index, kind="stream_mean") / H
        xn = self.post_attention_layernorm(r_full)
        m = self.mlp(xn.reshape(-1, xn.shape[-1])).view(-1, *r_full.shape)
        return r_full, m


class FoERankModel(RankModel):
    """This rank's share of an FoE-converted model (see the module docstring).

    Input: the token shard of this rank (`mesh.shard`; all tokens when G <= H).
    """

    def __init__(self, model: nn.Module, mesh: FoEMesh, device: torch.device | str = "cpu") -> None:
        config = getattr(model, "foe_config", None)
        if config is None or config.mode != "foe":
            raise ValueError("FoERankModel needs a model converted with convert(model, mode='foe'); "
                             "use ExactRankModel for mode='exact'")
        if config.num_groups != mesh.placement.num_groups:
            raise ValueError(f"the model has H={config.num_groups} groups but the mesh was built for "
                             f"H={mesh.placement.num_groups}")
        _check_expert_split(model, mesh)
        device = torch.device(device)
        super().__init__(model, mesh.ledger, device)
        self.mesh, self.H = mesh, config.num_groups
        self.layers = nn.ModuleList(FoERankLayer(i, layer, mesh, device) for i, layer in enumerate(model.model.layers))

    def begin(self, x: Tensor) -> State:  # broadcast of the embedding: m = 0 for every group
        return x, x.new_zeros(len(self.mesh.local_groups), *x.shape)

    def end(self, state: State) -> Tensor:
        r_full, m = state
        partial = (r_full + self.H * m).sum(0)
        return self.mesh.ring.all_reduce(partial, layer=FINAL, kind="final_mean") / self.H


def _check_expert_split(model: nn.Module, mesh: FoEMesh) -> None:
    s = mesh.placement.ranks_per_group
    for i, layer in enumerate(model.model.layers):
        groups = getattr(layer.mlp, "groups", None)
        if groups is not None and s > 1 and groups[0].num_experts % s:
            raise ValueError(f"model.layers.{i}: a group's {groups[0].num_experts} experts cannot be split over "
                             f"the {s} ranks of a group; use a world size G with (E/H) % (G/H) == 0")


def build_foe(model: nn.Module, config: FoEConfig | None = None, *, pg: dist.ProcessGroup | None = None,
              device: torch.device | str = "cpu", gpus_per_node: int | None = None,
              timeout_s: float | None = None) -> FoERankModel:
    """This rank's FoE runtime from a source HF MoE model (converted here with `config`) or an
    already converted one. `pg`: a ProcessGroup or a 1-D DeviceMesh (default: the world).

    Example (on every rank, e.g. under torchrun):
        >>> rank_model = build_foe(source_model, FoEConfig(num_groups=4))
        >>> logits = rank_model(shard_batch(input_ids, rank_model.mesh.shard, rank_model.mesh.placement.num_shards))
    """
    if getattr(model, "foe_config", None) is None:
        model, _ = convert(model, config or FoEConfig())
    elif config is not None:
        raise ValueError("the model is already converted; pass config only with a source model")
    mesh = FoEMesh(model.foe_config.num_groups, pg=as_process_group(pg), gpus_per_node=gpus_per_node,
                   timeout_s=timeout_s)
    return FoERankModel(model, mesh, device)


def as_process_group(pg) -> dist.ProcessGroup | None:
    """Accept a ProcessGroup, a 1-D DeviceMesh or None (the world)."""
    if pg is None or isinstance(pg, dist.ProcessGroup):
        return pg
    get_group = getattr(pg, "get_group", None)
    if get_group is None or pg.ndim != 1:
        raise TypeError(f"expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(pg).__name__}")
    return get_group()
