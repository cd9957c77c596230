"""split_group_streams (FoE form only): one residual stream per group.

After an MoE block whose experts were lowered with H groups (partials m_h, block output
y = sum_h m_h), the source's next attention reads Norm1(r + y). In the FoE form group h's
attention reads its own stream, Norm1(r + c*m_h) (models/group_streams.py, the equations every
form computes from; c = H unless `attn_stream_scale`). This pass clones, per group, every node
on a path from y to that attention's o_proj input, with y replaced by a call of group_streams'
attention_share(m_h, c), and points group h's head slice (from partition_groups) at its clone.
Split dense MLPs and shared experts (split_dense_mlps) contribute their shares the same way,
so a shared expert's share joins m_h, as in the module-level conversion. The residual side
needs no change: mean_h(r + H*m_h + H*o_h) = (r + y) + sum_h o_h, which is what the fused op
already computes from the shared residual and the partials.

Each clone projects all heads and keeps group h's (redundant full-width projections). An
RMSNorm over a whole q or k projection (OLMoE's q/k norm) reads, in every clone, each group's
own heads from that group's clone: the cross-group sum of squares of the distributed form.
The Hugging Face families convert at module level, where each group projects only its own
heads; for all four the two forms agree up to summation order (tested).
Graphs where "group h reads r + c*m_h" has no meaning are refused with an error rather than
half rewritten (_check_region): another block between y and the attention, a non-linear op
on y before it joins the residual stream (a post-MLP norm), or attention values also used
outside the attention (a KV cache written by the compiled graph).
"""
from __future__ import annotations

from torch import fx

from ..models.group_streams import attention_scale, attention_share
from .fuse_sum_route_dispatch import match_rms_norm
from .infra import (PASS_THROUGH, PassResult, ancestors, aten, descendants, erase_unused, is_op, shape_args,
                    skip_pass_through, val)
from .matches import ATTENTION_KEY, DENSE_KEY, MOE_KEY, AttentionMatch
from .partition_groups import GROUPS_KEY


def split_group_streams(gm: fx.GraphModule, attn_stream_scale: float | None = None) -> PassResult:
    H = gm.meta[GROUPS_KEY]
    # What adds group-local terms to the stream: experts (m_h) and split dense MLPs (share h).
    contributors = [m for m in gm.meta.get(MOE_KEY, []) if m.group_partials is not None]
    contributors += gm.meta.get(DENSE_KEY, [])
    attentions = [a for a in gm.meta.get(ATTENTION_KEY, []) if a.group_heads]
    if H == 1 or not contributors or not attentions:
        return PassResult("split_group_streams", 0)
    c = attention_scale(attn_stream_scale, H)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    feeding: dict[int, tuple[AttentionMatch, list]] = {}  # the next attention after each contributor
    for contributor in contributors:
        below = descendants([contributor.output])
        following = [a for a in attentions if a.sdpa in below]
        if following:  # none after the last layer: the final mean over groups is the shared stream
            attn = min(following, key=lambda a: position[a.sdpa])
            feeding.setdefault(id(attn), (attn, []))[1].append(contributor)
    for attn, sources in feeding.values():
        _split(gm, sources, contributors, attn, H, c, position)
        attn.reads_group_streams = True
    return PassResult("split_group_streams", len(feeding))


def _split(gm: fx.GraphModule, sources: list, contributors: list, attn: AttentionMatch, H: int, c: float,
           position: dict[fx.Node, int]) -> None:
    """Clone the path from the sources' outputs to attn's heads once per group (in lockstep),
    each output y replaced by c * (its group-h partial)."""
    g = gm.graph
    heads_input = attn.group_heads[0].args[0]  # every group's slice reads the same o_proj input
    outputs = [s.output for s in sources]
    region = sorted((descendants(outputs) & ancestors(heads_input)) | {heads_input}, key=position.__getitem__)
    _check_region(set(region), outputs, [x.output for x in contributors], heads_input)
    norm_inputs = _full_width_norm_inputs(region, attn)
    with g.inserting_before(heads_input.next):
        clones = [{s.output: _scaled_partial(g, s, h, c) for s in sources} for h in range(H)]
        gathered: dict[fx.Node, fx.Node] = {}
        for node in region:
            x = norm_inputs.get(node)
            if x is not None and x not in gathered:
                gathered[x] = _gather_own_heads(g, [clones[h][x] for h in range(H)])
            for h in range(H):
                clones[h][node] = g.node_copy(node, lambda n: gathered[n] if n is x else clones[h].get(n, n))
        for h, head_slice in enumerate(attn.group_heads):
            head_slice.replace_input_with(heads_input, clones[h][heads_input])
    # Explicitly: DCE keeps SDPA (dropout makes it "nondeterministic") and export's metadata checks.
    erase_unused(gm, set(region) | {u for n in region for u in n.users if _is_check(u)})


LINEAR = (aten.add.Tensor, aten.sub.Tensor, *PASS_THROUGH)


def _check_region(region: set[fx.Node], outputs: list[fx.Node], blocks: list[fx.Node], heads_input: fx.Node) -> None:
    """Refuse graphs where "group h reads r + c*m_h" has no meaning or would be half applied:
    another block between the outputs and the attention; a non-linear op on an output before it
    joins the residual stream (e.g. a post-MLP norm); attention internals used outside the
    attention (a KV cache, which the FoE form keeps per group)."""
    between = [o.name for o in blocks if o in region]
    if between:
        raise ValueError(f"the FoE form needs an attention between consecutive MoE/MLP blocks, but the output of "
                         f"{outputs[0].name} reaches the next attention through block output(s) {between}; "
                         "convert with mode='exact'")
    stream = set(outputs)  # values linear in the outputs: the residual stream up to the attention's norm
    changed = True
    while changed:
        changed = False
        for node in region - stream:
            inputs = [a for a in _value_inputs(node) if a in stream]
            scaled = is_op(node, aten.mul.Tensor) and not any(a in region for a in node.all_input_nodes if a not in stream)
            linear = is_op(node, *LINEAR) or (scaled and len(inputs) == 1)  # e.g. a shared expert's gate
            if inputs and linear:
                stream.add(node)
                changed = True
    for node in region - stream:
        for read in (a for a in _value_inputs(node) if a in stream):
            if not _feeds_residual(read, region, stream):
                raise ValueError(
                    f"{node.name} applies a non-linear op to the MoE/MLP output {outputs[0].name} before it joins "
                    "the residual stream (e.g. a post-MLP norm), where the FoE form's group stream r + c*m_h is "
                    "not defined; convert with mode='exact'")
    escaping = sorted(n.name for n in region - stream
                      if n is not heads_input and any(u not in region and not _is_check(u) for u in n.users))
    if escaping:
        raise ValueError(
            f"attention values {escaping} are also used outside the attention (e.g. stored in a KV cache), but the "
            "FoE form gives every group its own stream and cache; compile with use_cache=False, or use the "
            "module-level convert(model, mode='foe'), whose layers keep per-group caches")


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values `node` computes with: of a view or cast only the first (type_as,
    view_as and reshape_as take just a dtype or shape from the second, e.g. Gemma-style
    RMSNorms' output.type_as(x) with x the stream)."""
    return [node.args[0]] if is_op(node, *PASS_THROUGH) else node.all_input_nodes


def _feeds_residual(node: fx.Node, region: set[fx.Node], stream: set[fx.Node]) -> bool:
    """Whether `node`, or the stream value it is a view or cast of, is also used past the attention
    (as the residual of what follows): then the attention reads the residual stream itself."""
    while True:
        if node in region and any(u not in region and not _is_check(u) for u in node.users):
            return True
        if not (is_op(node, *PASS_THROUGH) and node.args[0] in stream):
            return False
        node = node.args[0]


def _is_check(node: fx.Node) -> bool:
    """torch.export's runtime checks on a value (dtype/device asserts): not a use of its data."""
    return node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_assert")


def _full_width_norm_inputs(region: list[fx.Node], attn: AttentionMatch) -> dict[fx.Node, fx.Node]:
    """Nodes of RMSNorms over a whole q or k projection (OLMoE) -> the projection they read."""
    found = {}
    for node in region:
        norm = match_rms_norm(node)
        proj = skip_pass_through(norm[0]) if norm is not None else None
        if proj in (attn.q_proj, attn.k_proj) and val(norm[0]).shape[-1] == val(proj).shape[-1]:  # not per head
            found.update(dict.fromkeys(norm[3], norm[0]))
    return found


def _gather_own_heads(g: fx.Graph, per_group: list[fx.Node]) -> fx.Node:
    """[..., heads*hd] from group h's own heads of per_group[h]: what a cross-group sum of squares sees."""
    width = val(per_group[0]).shape[-1] // len(per_group)
    parts = [g.call_function(aten.slice.Tensor, (p, -1, h * width, (h + 1) * width)) for h, p in enumerate(per_group)]
    out = g.call_function(aten.cat.default, (parts, -1))
    out.meta["val"] = val(per_group[0])
    return out


def _scaled_partial(g: fx.Graph, source, h: int, c: float) -> fx.Node:
    y = val(source.output)
    m_h = g.call_function(attention_share, (g.call_function(aten.select.int, (source.group_partials, 0, h)), c))
    shape = shape_args(g, y.shape)
    out = g.call_function(aten.to.dtype, (g.call_function(aten.reshape.default, (m_h, shape)), y.dtype))
    out.meta["val"] = y
    return out
