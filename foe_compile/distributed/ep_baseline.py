"""Expert-parallel baseline (vLLM/SGLang style) on the *source* model's weights.

Attention is data-parallel: every rank holds the full attention (and router, norms, dense and
shared MLPs, embedding, LM head) and runs it on the tokens it holds, with its own KV cache.
Which tokens a rank holds is the caller's choice: `shard_batch` (each rank its own sequences,
what DP-attention serving does), or the same batch on every rank (tokens replicated: every
rank then dispatches all T tokens, the per-rank volume the paper's EP formula prices).
Experts are sharded: rank r owns experts [r*E/G, (r+1)*E/G) and each MoE layer runs one
dispatch and one combine all-to-all with uneven splits (dispatch.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..families import Family, family_of, is_moe_block
from ..models import FoEAttention, GroupExperts, Router
from .accounting import Comm, Ledger
from .attention import KVCache, LocalAttention
from .base import RankModel
from .dispatch import dispatch_combine
from .foe_runtime import as_process_group


class EPMoE(nn.Module):
    """xn [T, d] -> the source MoE block's output for this rank's tokens, experts over `comm`."""

    def __init__(self, block: nn.Module, comm: Comm, layer: int, top_k: int, renormalize: bool,
                 device: torch.device) -> None:
        super().__init__()
        E = block.experts.gate_up_proj.shape[0]
        if E % comm.size:
            raise ValueError(f"model.layers.{layer}.mlp: {E} experts cannot be sharded over {comm.size} ranks; "
                             f"use a world size dividing {E}")
        self.comm, self.layer, self.per_rank = comm, layer, E // comm.size
        self.router = Router(block.gate.weight, list(range(E)), 1, top_k, renormalize, quota=False).to(device)
        r0 = comm.rank * self.per_rank
        ex = block.experts
        self.experts = GroupExperts(ex.gate_up_proj[r0:r0 + self.per_rank].to(device),
                                    ex.down_proj[r0:r0 + self.per_rank].to(device), r0, ex.act_fn)
        self.shared = block.shared_expert.to(device) if hasattr(block, "shared_expert") else None
        self.shared_gate = block.shared_expert_gate.to(device) if self.shared is not None else None

    def forward(self, xn: Tensor) -> Tensor:
        ids, weights = self.router.route(self.router.scores(xn), xn.dtype)
        out = dispatch_combine(self.comm, xn, ids, weights, ids // self.per_rank, self.experts, layer=self.layer)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(xn)) * self.shared(xn)
        return out


class EPRankLayer(nn.Module):
    def __init__(self, index: int, layer: nn.Module, comm: Comm, family: Family, top_k: int,
                 device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = layer.input_layernorm.to(device)
        self.post_attention_layernorm = layer.post_attention_layernorm.to(device)
        full = FoEAttention(layer.self_attn, 1, family)  # one "group" = every head
        self.self_attn = LocalAttention(full, [0], 1.0, None, device)
        renorm = family.renormalize(layer.self_attn.config)
        self.mlp = EPMoE(layer.mlp, comm, index, top_k, renorm, device) if is_moe_block(layer.mlp) \
            else layer.mlp.to(device)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None) -> Tensor:
        r = x + self.self_attn(self.input_layernorm(x)[None], rope, mask, cache)[0]
        xn = self.post_attention_layernorm(r)
        return r + self.mlp(xn.reshape(-1, xn.shape[-1])).view_as(r)


class EPRankModel(RankModel):
    """This rank's share of the expert-parallel baseline, built from the unconverted source model."""

    def __init__(self, model: nn.Module, comm: Comm, device: torch.device | str = "cpu") -> None:
        family = family_of(model)
        if getattr(model, "foe_config", None) is not None:
            raise ValueError("the EP baseline runs the source model; pass it before convert()")
        device = torch.device(device)
        super().__init__(model, comm.ledger, device)
        self.comm = comm
        k = int(model.config.num_experts_per_tok)
        self.layers = nn.ModuleList(EPRankLayer(i, layer, comm, family, k, device)
                                    for i, layer in enumerate(model.model.layers))


def build_ep(model: nn.Module, *, pg: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
             timeout_s: float | None = None) -> EPRankModel:
    """This rank's EP baseline from a source HF MoE model (all ranks call it together)."""
    pg = as_process_group(pg) or dist.group.WORLD
    return EPRankModel(model, Comm(pg, Ledger(), "world", timeout_s), device)
