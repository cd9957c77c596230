"""split_dense_mlps (FoE form only): dense gated MLPs -> H tensor-parallel shares.

Every gated MLP left after lower_experts (a dense layer's MLP, or a shared expert such as
Qwen2-MoE's), act = SiLU, GELU (erf or tanh) or ReLU, becomes H shares over blocks of its
intermediate units,
    share_h(x) = down[:, I_h](act(gate[I_h] x) * up[I_h] x),    output = sum_h share_h(x),
so that split_group_streams can put share h in group h's stream, as the module-level
conversion does (models/moe.py SplitMLP, whatever its act_fn). MLPs with biases, another
spelling (e.g. a fused gate_up projection) or an intermediate size that H does not divide stay
whole, in the shared stream. Values are preserved up to summation order.
"""
from __future__ import annotations

from torch import fx

from .expert_unit import match_gated_mlp
from .infra import PassResult, aten, val
from .matches import DENSE_KEY, DenseSplit
from .partition_groups import GROUPS_KEY


def split_dense_mlps(gm: fx.GraphModule) -> PassResult:
    H = gm.meta[GROUPS_KEY]
    splits = []
    if H > 1:
        for node in list(gm.graph.nodes):
            found = match_gated_mlp(node)
            if found and val(found[2]).shape[0] % H == 0:
                splits.append(_split(gm, node, *found, H))
    gm.meta[DENSE_KEY] = splits
    return PassResult("split_dense_mlps", len(splits))


def _split(gm: fx.GraphModule, down: fx.Node, x: fx.Node, act: fx.Node, w_gate: fx.Node, w_up: fx.Node,
           w_down: fx.Node, H: int) -> DenseSplit:
    g, width = gm.graph, val(w_gate).shape[0] // H
    with g.inserting_before(down):
        shares = []
        for h in range(H):
            rows = (h * width, (h + 1) * width)
            gate = g.call_function(aten.linear.default, (x, g.call_function(aten.slice.Tensor, (w_gate, 0, *rows))))
            up = g.call_function(aten.linear.default, (x, g.call_function(aten.slice.Tensor, (w_up, 0, *rows))))
            gated = g.call_function(act.target, (gate, *act.args[1:]), dict(act.kwargs))  # the source's activation
            hidden = g.call_function(aten.mul.Tensor, (gated, up))
            w_h = g.call_function(aten.slice.Tensor, (w_down, 1, *rows))
            shares.append(g.call_function(aten.linear.default, (hidden, w_h)))
        stacked = g.call_function(aten.stack.default, (shares, 0))
        total = g.call_function(aten.sum.dim_IntList, (stacked, [0]))
    stacked.meta["val"] = val(down).new_empty(H, *val(down).shape)
    total.meta["val"] = val(down)
    down.replace_all_uses_with(total)
    g.erase_node(down)
    return DenseSplit(total, stacked)
