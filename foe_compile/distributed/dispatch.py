"""Expert-parallel dispatch and combine over uneven all-to-alls (the vLLM/SGLang pattern).

1. sort this rank's (token, pick) pairs by the rank owning the picked expert;
2. exchange per-rank row counts (all_to_all_single of [n] int64, kind "<kind>_counts");
3. send token rows (kind "dispatch") and expert ids (kind "dispatch_ids");
4. owners run their experts, one pick per received row;
5. send results back along the reverse splits (kind "combine"); the source rank applies the
   routing weights and sums (weights never travel).
Per rank, payload bytes = 2 * (picks owned by other ranks) * d * element size; under uniform
routing over n ranks that is 2k(n-1)/n * T*d (`comm.ep_volume`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import GroupExperts
from .accounting import Comm


def dispatch_combine(comm: Comm, x: Tensor, ids: Tensor, weights: Tensor, owner: Tensor, experts: GroupExperts,
                     *, layer: int) -> Tensor:
    """x [T, d], ids/weights/owner [T, n] (expert id, routing weight, owning rank in `comm`)
    -> [T, d] = sum over picks of weight * expert(x)."""
    T, n = ids.shape
    flat_owner = owner.flatten()
    order = torch.argsort(flat_owner, stable=True)
    token = order // n
    send = torch.bincount(flat_owner, minlength=comm.size)
    recv = comm.exchange_counts(send, layer=layer, kind="dispatch")
    send_counts, recv_counts = send.tolist(), recv.tolist()
    rows = comm.all_to_all(x[token], send_counts, recv_counts, layer=layer, kind="dispatch")
    got_ids = comm.all_to_all(ids.flatten()[order], send_counts, recv_counts, layer=layer, kind="dispatch_ids")
    y = experts(rows, got_ids[:, None], rows.new_ones(rows.shape[0], 1))  # one pick per row, weight 1
    back = comm.all_to_all(y, recv_counts, send_counts, layer=layer, kind="combine")
    out = torch.zeros_like(x)
    return out.index_add_(0, token, back * weights.flatten()[order, None].to(back.dtype))


def slice_experts(group: GroupExperts, start: int, stop: int, device: torch.device) -> GroupExperts:
    """Experts [start, stop) of a group's block (positions inside the block), on `device`."""
    return GroupExperts(group.gate_up_proj[start:stop].to(device), group.down_proj[start:stop].to(device),
                        group.first_id + start, group.act_fn)
