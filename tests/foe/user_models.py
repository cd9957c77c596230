"""MoE transformers written by hand with standard ops (not Hugging Face classes), for the FX path."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d: int, inner: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, inner, bias=False)  # gate
        self.w3 = nn.Linear(d, inner, bias=False)  # up
        self.w2 = nn.Linear(inner, d, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DenseLoopMoE(nn.Module):
    """Every expert on every token, masked by its routing weight (a common tutorial form)."""

    def __init__(self, d: int, inner: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, inner) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            gate = (weights * (ids == e)).sum(dim=-1, keepdim=True)
            out = out + gate * expert(x)
        return out


class IndexAddLoopMoE(DenseLoopMoE):
    """The transformers v4 form: per expert, gather its tokens, run it, index_add_ back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=len(self.experts)).permute(2, 1, 0)  # [E, k, T]
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            y = expert(x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out.reshape(shape)


class UserBlock(nn.Module):
    """Pre-norm GQA attention + MoE, written with standard ops. Variants the FoE form must refuse:
    attention=False (an MoE block right after the previous one), post_norm=True (the MoE output
    is normalised before the residual add, as in OLMo2)."""

    def __init__(self, d: int, heads: int, kv_heads: int, moe: nn.Module, attention: bool = True,
                 post_norm: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.attention = attention
        self.post_norm = nn.RMSNorm(d, eps=1e-6) if post_norm else nn.Identity()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(d, kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention:
            x = x + self.attend(self.norm1(x))
        return x + self.post_norm(self.moe(self.norm2(x)))

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        q = self.q(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, T, -1))


class UserMoETransformer(nn.Module):
    def __init__(self, moe_cls=DenseLoopMoE, vocab: int = 96, d: int = 32, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, experts: int = 6, top_k: int = 2, inner: int = 24,
                 without_attention: tuple[int, ...] = (), post_norm: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(UserBlock(d, heads, kv_heads, moe_cls(d, inner, experts, top_k),
                                              attention=i not in without_attention, post_norm=post_norm, bias=bias)
                                    for i in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
