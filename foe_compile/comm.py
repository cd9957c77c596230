"""Per-layer communication volumes (paper Tables 3-4), in units of T*d elements.

G GPUs, H groups, k experts per token. Ring all-reduce over n ranks moves 2(n-1)/n per rank;
an all-to-all dispatch + combine of k copies per token moves 2k(G-1)/G.
"""
from __future__ import annotations


def all_reduce_volume(ranks: int) -> float:
    return 2.0 * (ranks - 1) / ranks


def ep_volume(top_k: int, gpus: int) -> float:
    """Expert parallelism: all-to-all dispatch and combine."""
    return 2.0 * top_k * (gpus - 1) / gpus


def foe_volume(top_k: int, groups: int, gpus: int) -> float:
    """FoE: one all-reduce over min(G, H) ranks, plus an intra-group all-to-all when G > H."""
    n = min(gpus, groups)
    return all_reduce_volume(n) + 2.0 * top_k * max(gpus - groups, 0) / gpus


def exact_volume(top_k: int, groups: int, gpus: int) -> float:
    """Exact mode: FoE's traffic plus a second all-reduce after the MoE."""
    return foe_volume(top_k, groups, gpus) + all_reduce_volume(min(gpus, groups))


def multinode_speedup_asymptote(top_k: int, groups: int, bandwidth_ratio: float) -> float:
    """Limit of EP/FoE communication time over many nodes: kHr / (kH + r(H-1))."""
    k, H, r = top_k, groups, bandwidth_ratio
    return k * H * r / (k * H + r * (H - 1))
