"""The exact variant: tensor-parallel attention + local experts + an all-reduce after the MoE.

Built from a model converted with mode="exact" (H groups, H a multiple of the world size G;
every rank sees all tokens). Per layer, on a rank holding groups L:
    r  = x + all_reduce_sum(sum_{h in L} H * Attn_h(Norm1(x))) / H      # kind "attn_sum"
    x' = r + all_reduce_sum(sum_{h in L} m_h(Norm2(r)))                  # kind "moe_sum"
m_h evaluates the picks of the global top-k that fall in group h's expert block, so x' equals
the source model's output up to summation order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import FoEConfig
from ..convert import convert
from ..models import ExactDecoderLayer
from .attention import KVCache, LocalAttention
from .base import RankModel
from .foe_runtime import as_process_group
from .mesh import FoEMesh
from .moe import LocalMLP


class ExactRankLayer(nn.Module):
    def __init__(self, index: int, layer: ExactDecoderLayer, mesh: FoEMesh, device: torch.device) -> None:
        super().__init__()
        self.index, self.comm, self.H = index, mesh.world, layer.num_groups
        self.input_layernorm = layer.input_layernorm.to(device)
        self.post_attention_layernorm = layer.post_attention_layernorm.to(device)
        reduce = lambda t: self.comm.all_reduce(t, layer=index, kind="qk_norm")  # noqa: E731
        self.self_attn = LocalAttention(layer.self_attn, mesh.local_groups, float(self.H), reduce, device)
        self.mlp = LocalMLP(layer.mlp, mesh.local_groups, device, layer=index)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None) -> Tensor:
        n = len(self.self_attn.groups)
        normed = self.input_layernorm(x).expand(n, *x.shape)
        attn = self.self_attn(normed, rope, mask, cache).sum(0)
        r = x + self.comm.all_reduce(attn, layer=self.index, kind="attn_sum") / self.H
        xn = self.post_attention_layernorm(r)
        m = self.mlp(xn.reshape(-1, xn.shape[-1])).sum(0).view_as(r)
        return r + self.comm.all_reduce(m, layer=self.index, kind="moe_sum")


class ExactRankModel(RankModel):
    """This rank's share of an exact-mode model; input: the whole batch on every rank."""

    def __init__(self, model: nn.Module, mesh: FoEMesh, device: torch.device | str = "cpu") -> None:
        config = getattr(model, "foe_config", None)
        if config is None or config.mode != "exact":
            raise ValueError("ExactRankModel needs a model converted with convert(model, mode='exact')")
        if mesh.placement.ranks_per_group != 1:
            raise ValueError(f"the exact runtime needs H={config.num_groups} to be a multiple of the world size "
                             f"{mesh.placement.world_size} (convert with num_groups=<a multiple of G>)")
        device = torch.device(device)
        super().__init__(model, mesh.ledger, device)
        self.mesh = mesh
        self.layers = nn.ModuleList(ExactRankLayer(i, layer, mesh, device)
                                    for i, layer in enumerate(model.model.layers))


def build_exact(model: nn.Module, config: FoEConfig | None = None, *, pg: dist.ProcessGroup | None = None,
                device: torch.device | str = "cpu", timeout_s: float | None = None) -> ExactRankModel:
    """This rank's exact runtime from a source model (converted here, mode='exact', H = G unless
    `config` says otherwise) or an already converted exact-mode model."""
    pg = as_process_group(pg)
    if getattr(model, "foe_config", None) is None:
        G = dist.get_world_size(pg)
        config = (config or FoEConfig(num_groups=G)).replace(mode="exact")
        model, _ = convert(model, config)
    mesh = FoEMesh(model.foe_config.num_groups, pg=pg, timeout_s=timeout_s)
    return ExactRankModel(model, mesh, device)
