"""Expert-to-group assignment: which E/H experts each group owns, per MoE layer.

Calibrated assignment spreads experts that the source router often selects together over
different groups, so quota routing (k/H picks per group) keeps more of the global top-k.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn


def contiguous(num_experts: int) -> list[int]:
    return list(range(num_experts))


def check_permutation(perm: list[int], num_experts: int) -> list[int]:
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(num_experts)):
        raise ValueError(
            f"expert_assignment must be a permutation of range({num_experts}) (group h owns "
            f"perm[h*E/H:(h+1)*E/H]); got {len(perm)} entries {perm[:8]}..."
        )
    return perm


@torch.no_grad()
def co_selection_counts(model: nn.Module, layers: list[int], inputs: Iterable[Tensor]) -> dict[int, np.ndarray]:
    """Run the *source* model on calibration token batches; per MoE layer, C[e, f] = number of
    tokens whose global top-k holds both e and f (C[e, e] = load of e)."""
    counts: dict[int, np.ndarray] = {}
    hooks = []
    for i in layers:
        router = model.model.layers[i].mlp.gate
        E = router.weight.shape[0]
        counts[i] = np.zeros((E, E), dtype=np.int64)

        def hook(_module, _args, output, i=i):
            counts[i] += co_selection(output[2], E)  # output[2]: [..., k] source expert ids

        hooks.append(router.register_forward_hook(hook))
    try:
        for batch in inputs:
            model(input_ids=batch.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return counts


def co_selection(ids: Tensor, num_experts: int) -> np.ndarray:
    """C[e, f] = number of tokens whose picks `ids` [..., k] hold both e and f (C[e, e] = load of e)."""
    ids = ids.reshape(-1, ids.shape[-1])
    onehot = torch.zeros(ids.shape[0], num_experts, dtype=torch.float64)
    onehot.scatter_(1, ids.cpu(), 1.0)
    return (onehot.T @ onehot).round().long().numpy()


def calibrated(counts: np.ndarray, num_groups: int, sweeps: int = 4) -> list[int]:
    """Balanced partition of experts into H groups minimising co-selection inside a group.

    Greedy (heaviest expert first, into the group it co-occurs with least) followed by
    pairwise-swap local search. Returns a permutation: group h owns perm[h*E/H:(h+1)*E/H].
    """
    E = counts.shape[0]
    size = E // num_groups
    co = counts.astype(np.float64).copy()
    np.fill_diagonal(co, 0.0)
    load = np.diag(counts).astype(np.float64)
    group_of = np.full(E, -1)
    fill = np.zeros(num_groups, dtype=np.int64)
    for e in np.argsort(-load, kind="stable"):
        cost = np.array([co[e, group_of == h].sum() if fill[h] < size else np.inf for h in range(num_groups)])
        h = int(np.argmin(cost + 1e-9 * fill))
        group_of[e], fill[h] = h, fill[h] + 1
    for _ in range(sweeps):  # swap e <-> f across groups while it lowers within-group co-selection
        improved = False
        for e in range(E):
            for f in range(e + 1, E):
                ge, gf = group_of[e], group_of[f]
                if ge == gf:
                    continue
                in_e, in_f = group_of == ge, group_of == gf
                before = co[e, in_e].sum() + co[f, in_f].sum()
                after = co[e, in_f].sum() - co[e, f] + co[f, in_e].sum() - co[f, e]
                if after < before - 1e-9:
                    group_of[e], group_of[f] = gf, ge
                    improved = True
        if not improved:
            break
    return [int(e) for h in range(num_groups) for e in np.flatnonzero(group_of == h)]
