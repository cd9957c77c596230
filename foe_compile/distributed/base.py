"""What every distributed runtime shares: replicated embedding, rotary, final norm and LM head
around a stack of rank-local layers, with prefill and single-token decode on a KVCache."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .accounting import Ledger
from .attention import KVCache, causal_mask


class RankModel(nn.Module):
    """One rank's share of a causal LM: input_ids [B, T] -> logits [B, T, V].

    Subclasses set `self.layers` and implement `begin`/`end` (layer state in and out). With a
    cache, call with the prompt first, then with one or more new tokens per step.
    """

    def __init__(self, model: nn.Module, ledger: Ledger, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens.to(device)
        self.rotary_emb = model.model.rotary_emb.to(device)
        self.norm = model.model.norm.to(device)
        self.lm_head = model.lm_head.to(device)
        self.ledger, self.device = ledger, device
        self.layers: nn.ModuleList = nn.ModuleList()

    def begin(self, x: Tensor):
        return x

    def end(self, state) -> Tensor:
        return state

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        x = self.embed_tokens(input_ids)
        positions = torch.arange(past, past + T, device=self.device).expand(B, T)
        rope = self.rotary_emb(x, positions)
        mask = causal_mask(T, past, x.dtype, self.device)
        state = self.begin(x)
        for layer in self.layers:
            state = layer(state, rope, mask, cache)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.norm(self.end(state)))


def shard_batch(input_ids: Tensor, shard: int, num_shards: int) -> Tensor:
    """Sequences [shard*B/n, (shard+1)*B/n) of a batch [B, T] (data-parallel split by sequence)."""
    B = input_ids.shape[0]
    if B % num_shards:
        raise ValueError(f"a batch of {B} sequences cannot be split into {num_shards} equal shards; "
                         f"use a batch size divisible by {num_shards}")
    step = B // num_shards
    return input_ids[shard * step:(shard + 1) * step]
