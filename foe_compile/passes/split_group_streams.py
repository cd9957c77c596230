"""split_group_streams (FoE form only): one residual stream per group.

After an MoE block whose experts were lowered with H groups (partials m_h, block output
y = sum_h m_h), the source's next attention reads Norm1(r + y). In the FoE form group h's
attention reads its own stream, Norm1(r + c*m_h) (DESIGN.md; c = H unless `attn_stream_scale`).
This pass clones, per group, every node on a path from y to that attention's o_proj input,
with y replaced by c*m_h, and points group h's head slice (from partition_groups) at its
clone. The residual side needs no change: mean_h(r + H*m_h + H*o_h) = (r + y) + sum_h o_h,
which is what the fused op already computes from the shared residual and the partials.

Each clone projects all heads and keeps group h's (the redundant full-width form, which also
covers q/k norms that span every head: they normalise group h's full-width projection of its
own stream, where the module-level OLMoE conversion reduces the sum of squares across groups).
The Hugging Face families convert at module level, where each group projects only its own
heads; for them the two forms agree up to summation order (tested). Whatever sits between y and the attention stays
shared: a shared expert added to y is added to every group's stream unchanged, and an
attention after a dense (non-MoE) layer reads the shared stream.
"""
from __future__ import annotations

from torch import fx

from .infra import PassResult, ancestors, aten, descendants, erase_unused, val
from .matches import ATTENTION_KEY, MOE_KEY, AttentionMatch, MoEMatch
from .partition_groups import GROUPS_KEY


def split_group_streams(gm: fx.GraphModule, attn_stream_scale: float | None = None) -> PassResult:
    H = gm.meta[GROUPS_KEY]
    blocks = [m for m in gm.meta.get(MOE_KEY, []) if m.group_partials is not None]
    attentions = [a for a in gm.meta.get(ATTENTION_KEY, []) if a.group_heads]
    if H == 1 or not blocks or not attentions:
        return PassResult("split_group_streams", 0)
    c = H if attn_stream_scale is None else attn_stream_scale
    if not 1 <= c <= H:
        raise ValueError(f"attn_stream_scale must lie in [1, H={H}], got {c}")
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    rewrites = 0
    for block in blocks:
        below = descendants([block.output])
        following = [a for a in attentions if a.sdpa in below]
        if following:  # none after the last layer: the final mean over groups is the shared stream
            _split(gm, block, min(following, key=lambda a: position[a.sdpa]), H, c, position)
            block.feeds_group_streams = True
            rewrites += 1
    return PassResult("split_group_streams", rewrites)


def _split(gm: fx.GraphModule, block: MoEMatch, attn: AttentionMatch, H: int, c: float,
           position: dict[fx.Node, int]) -> None:
    g, y = gm.graph, block.output
    heads_input = attn.group_heads[0].args[0]  # every group's slice reads the same o_proj input
    region = sorted((descendants([y]) & ancestors(heads_input)) | {heads_input}, key=position.__getitem__)
    y_val = val(y)
    with g.inserting_before(heads_input.next):
        for h, head_slice in enumerate(attn.group_heads):
            m_h = g.call_function(aten.select.int, (block.group_partials, 0, h))
            scaled = g.call_function(aten.mul.Tensor, (m_h, c))
            y_h = g.call_function(aten.to.dtype, (g.call_function(aten.reshape.default, (scaled, list(y_val.shape))),
                                                  y_val.dtype))
            y_h.meta["val"] = y_val
            clones = {y: y_h}
            for node in region:
                clones[node] = g.node_copy(node, lambda n: clones.get(n, n))
            head_slice.replace_input_with(heads_input, clones[heads_input])
    erase_unused(gm, region)  # explicitly: DCE keeps SDPA (dropout makes it "nondeterministic")
