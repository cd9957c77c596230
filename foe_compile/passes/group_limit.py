"""Group-limited top-k for moe_router: recognise DeepSeek-V3's group limit in a captured router.

    group_scores = select.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)   [T, n_group]
    best         = torch.topk(group_scores, k=topk_group, dim=-1)[1]                       [T, topk_group]
    kept         = zeros_like(group_scores).scatter_(1, best, 1)                            [T, n_group]
    mask         = kept.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    select       = select.masked_fill(~mask.bool(), -inf)        (or mask == 0; fill 0.0: Mistral 4)

(transformers 5.17: DeepseekV3TopkRouter, Glm4MoeTopkRouter, NemotronH, dots1, Solar Open, ...; at
n_group = 1 it changes nothing and is matched all the same). Every op is checked: the top-2 and
group top-k are over the last dim and largest, the scatter writes 1 along the groups, the
expansion is group-major, the fill is -inf or 0, and the group scores read the very selection that
is masked. A group score other than the top-2 sum (DeepSeek-V2's max, whose weights are also the
masked scores) is refused with the reason, as foe::sum_route_dispatch does not compute it.
"""
from __future__ import annotations

import math
import operator

from torch import fx

from .infra import aten, is_op, skip_exact, skip_pass_through, val

_NOT_LIMIT = "router top-k over a masked selection that is not DeepSeek-V3's group limit ({})"


def match_group_limit(masked: fx.Node) -> tuple[fx.Node, dict] | str | None:
    """(the selection before masking, {n_group, topk_group, group_fill_zero}) when `masked` is a
    group-limited selection; a reason when it is a masked selection the op does not compute; None
    when `masked` is not a masked_fill."""
    if not is_op(masked, aten.masked_fill.Scalar):
        return None
    select, mask, fill = masked.args
    if not isinstance(fill, (int, float)) or not (fill == 0 or fill == -math.inf):
        return _NOT_LIMIT.format(f"fill value {fill}")
    if is_op(mask, aten.bitwise_not.default, aten.logical_not.default):
        kept = mask.args[0]
    elif is_op(mask, aten.eq.Scalar) and mask.args[1] == 0:
        kept = mask.args[0]
    else:
        return _NOT_LIMIT.format("the mask is not the complement of a kept-groups mask")
    expand = skip_pass_through(kept)  # a 0/1 mask: any cast keeps it
    if not is_op(expand, aten.expand.default) or val(expand).dim() != 3 or val(mask).shape != val(select).shape:
        return _NOT_LIMIT.format("the mask is not a per-group mask expanded over the experts")
    n_group, size = val(expand).shape[1:]
    if n_group * size != val(select).shape[-1]:
        return _NOT_LIMIT.format(f"{n_group} groups of {size} for {val(select).shape[-1]} experts")
    unsqueeze = skip_pass_through(expand.args[0])
    if not is_op(unsqueeze, aten.unsqueeze.default) or unsqueeze.args[1] not in (-1, 2):
        return _NOT_LIMIT.format("the group mask is not unsqueezed on the last dim")
    scatter = skip_pass_through(unsqueeze.args[0])
    if not is_op(scatter, aten.scatter_.value, aten.scatter.value) or scatter.args[1] not in (1, -1) or \
            scatter.args[3] != 1:
        return _NOT_LIMIT.format("the kept groups are not marked by scattering 1 along the groups")
    zeros, best = scatter.args[0], scatter.args[2]
    if not is_op(zeros, aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default):
        return _NOT_LIMIT.format("the kept-groups mask does not start as zeros")
    group_topk = _topk_output(best, 1)
    if group_topk is None or not isinstance(group_topk.args[1], int):
        return _NOT_LIMIT.format("the kept groups are not a top-k of group scores")
    topk_group = group_topk.args[1]
    group_scores = skip_exact(group_topk.args[0])
    if is_op(group_scores, aten.amax.default) or (group_scores.target is operator.getitem and
                                                   is_op(group_scores.args[0], aten.max.dim)):
        return ("group-limited top-k scoring each group by its maximum (DeepSeek-V2's group_limited_greedy, "
                "whose weights are the masked scores); foe::sum_route_dispatch scores groups by their top-2 sum")
    if not is_op(group_scores, aten.sum.dim_IntList) or list(group_scores.args[1]) not in ([-1], [2]) or \
            (len(group_scores.args) > 2 and group_scores.args[2]):
        return _NOT_LIMIT.format("the group scores are not a sum over each group")
    if tuple(val(zeros).shape) != tuple(val(group_scores).shape):
        return _NOT_LIMIT.format("the kept-groups mask is not shaped like the group scores")
    top2 = _topk_output(group_scores.args[0], 0)
    if top2 is None or top2.args[1] != 2:
        return _NOT_LIMIT.format("the group scores are not the sum of each group's top 2")
    grouped = top2.args[0]
    if skip_exact(grouped) is not skip_exact(select) or tuple(val(grouped).shape[1:]) != (n_group, size):
        return _NOT_LIMIT.format("the group scores do not read the masked selection in contiguous groups")
    return select, {"n_group": int(n_group), "topk_group": int(topk_group), "group_fill_zero": fill == 0}


def _topk_output(node: fx.Node, index: int) -> fx.Node | None:
    """The aten.topk (largest, over the last dim) whose output `index` is `node`; else None."""
    if node.target is not operator.getitem or node.args[1] != index or not is_op(node.args[0], aten.topk.default):
        return None
    topk = node.args[0]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    if dim not in (-1, val(topk.args[0]).dim() - 1) or not largest:
        return None
    return topk
