"""The FoE runtime: each rank runs its groups of a converted model; one all-reduce per layer.

Per layer, a rank holding local groups L runs the equations of models/group_streams.py
(foe_layer) on its state (r_full [B, T, d], m [|L|, B, T, d]); their mean over groups is the
all-reduce of the rank's sum over L, divided by H (kind "stream_mean"), and the experts are
group-local. After the last layer, final_mean with the same all-reduce (once per forward, kind
"final_mean"). OLMoE adds a tiny [B, T, 2] all-reduce per layer for its full-width q/k norm
(kind "qk_norm"). With G > H ranks (mesh.py), each rank also runs its group's intra-group
dispatch/combine (dispatch.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import FoEConfig
from ..convert import convert
from ..models import FoEDecoderLayer
from ..models.group_streams import broadcast, final_mean, foe_layer, mean_over_groups
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
        def attend(x: Tensor) -> Tensor:
            return self.self_attn(self.input_layernorm(x), rope, mask, cache)

        return foe_layer(*state, self.H, self.c, attend, self.mix)

    def mix(self, streams: Tensor, attn: Tensor) -> State:
        """The one all-reduce, then Norm2 and the local groups' MLPs."""
        reduce = lambda t: self.ring.all_reduce(t, layer=self.index, kind="stream_mean")  # noqa: E731
        r_full = mean_over_groups(streams + attn, self.H, reduce)
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

    def begin(self, x: Tensor) -> State:
        return broadcast(x, len(self.mesh.local_groups))

    def end(self, state: State) -> Tensor:
        return final_mean(*state, self.H, lambda t: self.mesh.ring.all_reduce(t, layer=FINAL, kind="final_mean"))


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
