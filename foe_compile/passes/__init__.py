"""The FX pass pipeline over pre-dispatch ATen graphs, in order. One pass per file.

Ordering constraints:
1. find_moe_blocks and find_gqa_attention only record (gm.meta); every rewrite needs them.
2. partition_groups before fuse_sum_route_dispatch: the fused op takes the per-group
   attention partials as its `partials` input (the all-reduce point).
3. fuse_sum_route_dispatch before lower_experts: it produces the token grouping
   (pairs/offsets) that foe::experts_swiglu consumes; without it lower_experts groups itself.
4. FoE form only, after lower_experts: assign_experts (reorders what the two foe:: ops read),
   split_dense_mlps (dense MLPs and shared experts ->
   per-group shares; after lowering, so the experts' SwiGLUs are gone), then
   split_group_streams, which reads every per-group partial.
mode="exact" applies exact rewrites only. mode="foe" (the FoE form: quota routing in the fused
op, one residual stream per group) changes what a model computes; it runs only when asked
for explicitly (convert(model, mode="foe") or the backend's mode option).
"""
from __future__ import annotations

from torch import fx

from .assign_experts import assign_experts
from .find_gqa_attention import find_gqa_attention
from .find_moe_blocks import find_moe_blocks
from .fuse_sum_route_dispatch import fuse_sum_route_dispatch
from .infra import PassResult, cleanup, dump
from .matches import MOE_KEY, UNTOUCHED_KEY
from .lower_experts import lower_experts
from .partition_groups import GROUPS_KEY, partition_groups
from .split_dense_mlps import split_dense_mlps
from .split_group_streams import split_group_streams

__all__ = ["PassResult", "run_passes"]


def run_passes(gm: fx.GraphModule, num_groups: int | None = None, mode: str = "exact",
               attn_stream_scale: float | None = None, expert_perms: list[list[int]] | None = None,
               leave: dict[int, str] | None = None) -> list[PassResult]:
    """Run the pipeline in place; returns each pass's result. See the module docstring.
    expert_perms (FoE form): one expert permutation per MoE block, in graph order.
    leave: MoE blocks (index in graph order -> why) to leave as written, e.g. rewrites that failed
    translation validation; they join find_moe_blocks' own refusals in gm.meta[UNTOUCHED_KEY]."""
    if mode not in ("exact", "foe"):
        raise ValueError(f"mode must be 'exact' or 'foe', got {mode!r}")
    foe = mode == "foe"
    steps = [
        lambda g: _find_and_leave(g, leave or {}, foe),
        find_gqa_attention,
        lambda g: partition_groups(g, num_groups, mode),
        lambda g: fuse_sum_route_dispatch(g, g.meta[GROUPS_KEY] if foe else 1),
        lambda g: lower_experts(g, g.meta[GROUPS_KEY]),
    ]
    if not foe and (expert_perms is not None or attn_stream_scale is not None):
        raise ValueError("expert_perms and attn_stream_scale only change the FoE form; the exact form takes neither")
    if foe:
        steps += [lambda g: assign_experts(g, expert_perms), split_dense_mlps, lambda g: split_group_streams(g, attn_stream_scale)]
    dump(gm, 0, "captured")
    results = []
    for i, step in enumerate(steps, start=1):
        result = step(gm)
        if result.modified and not result.name.startswith("find_"):
            cleanup(gm)
        dump(gm, i, result.name)
        results.append(result)
    return results


def _find_and_leave(gm: fx.GraphModule, leave: dict[int, str], foe: bool) -> PassResult:
    """find_moe_blocks, minus the blocks to leave as written. The FoE form needs every MoE block in
    the fused op (quota routing, group streams): an untouched one makes it impossible, so say why."""
    result = find_moe_blocks(gm)
    blocks = gm.meta[MOE_KEY]
    gm.meta[UNTOUCHED_KEY] += [(blocks[i].name, why) for i, why in sorted(leave.items())]
    gm.meta[MOE_KEY] = [b for i, b in enumerate(blocks) if i not in leave]
    untouched = gm.meta[UNTOUCHED_KEY]
    if foe and untouched:
        why = "; ".join(f"{name}: {reason}" for name, reason in untouched)
        raise ValueError(f"the FoE form needs every MoE block rewritten, but {len(untouched)} cannot be ({why}); "
                         "convert with mode='exact' (those blocks then stay as written)")
    return PassResult(result.name, len(gm.meta[MOE_KEY]))
