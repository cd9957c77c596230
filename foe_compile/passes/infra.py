"""Shared pass machinery: results, the one cleanup, graph dumps and small node predicates.

Passes run on ATen graphs in pre-dispatch IR (torch.export's training IR, or `make_fx(...,
pre_dispatch=True)` of a Dynamo graph): high-level ops such as aten.linear, aten.softmax.int,
aten.topk and aten.scaled_dot_product_attention are still whole, and every node carries its
FakeTensor in node.meta["val"].
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

aten = torch.ops.aten


@dataclass
class PassResult:
    name: str
    rewrites: int  # matches found (find_*) or rewrites applied (everything else)

    @property
    def modified(self) -> bool:
        return self.rewrites > 0


def cleanup(gm: fx.GraphModule) -> None:
    """The one cleanup every modifying pass ends with: DCE, lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def dump(gm: fx.GraphModule, step: int, name: str) -> None:
    """With FOE_DUMP_GRAPHS=<dir>, write the graph after every pass (<dir>/<step>-<name>.txt)."""
    folder = os.environ.get("FOE_DUMP_GRAPHS")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{step:02d}-{name}.txt"), "w") as f:
        f.write(gm.print_readable(print_output=False))


def is_op(node: object, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def users(node: fx.Node, *targets) -> list[fx.Node]:
    return [u for u in node.users if is_op(u, *targets)]


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def val(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def shape_args(g: fx.Graph, shape: Iterable) -> list:
    """Reshape arguments for `shape` (a FakeTensor's, possibly symbolic) in graph `g`: an int where
    static; where symbolic, the graph input that carries that size (a SymInt input, or
    aten.sym_size.int of a tensor input), else -1 (once: e.g. a flattened batch x sequence).
    Raw SymInts in node arguments would not survive code generation."""
    inputs = [n for n in g.find_nodes(op="placeholder") if "val" in n.meta]
    out = []
    for size in shape:
        if is_concrete_int(size):
            out.append(int(size))
        elif (node := _input_size(g, inputs, size)) is not None:
            out.append(node)
        elif -1 not in out:
            out.append(-1)
        else:
            raise ValueError(f"cannot express the shape {tuple(shape)} from the graph's input sizes")
    return out


def _input_size(g: fx.Graph, inputs: list[fx.Node], size: torch.SymInt) -> fx.Node | None:
    for node in inputs:
        v = node.meta["val"]
        if isinstance(v, torch.SymInt) and not is_concrete_int(v) and v.node.expr == size.node.expr:
            return node
        for i, t in enumerate(v.shape if isinstance(v, torch.Tensor) else ()):
            if not is_concrete_int(t) and t.node.expr == size.node.expr:
                sym = g.call_function(aten.sym_size.int, (node, i))
                sym.meta["val"] = size
                return sym
    return None


def getitem_users(node: fx.Node) -> dict[int, fx.Node]:
    """Index -> getitem node, for a node returning a tuple (topk, sort, chunk...)."""
    import operator

    return {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem}


# Ops that pass a tensor through without changing its values (up to dtype casts).
PASS_THROUGH = (aten.view.default, aten.reshape.default, aten.view_as.default, aten.reshape_as.default, aten.type_as.default,
                aten.alias.default, aten.to.dtype,
                aten._to_copy.default, aten.contiguous.default, aten.clone.default)


def skip_pass_through(node: fx.Node) -> fx.Node:
    """Walk up through views/casts to the node that produced the values."""
    while is_op(node, *PASS_THROUGH):
        node = node.args[0]
    return node


_CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default)


def _mantissa_bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps)) + 1


def keeps_values(cast: fx.Node) -> bool:
    """Whether the cast `cast` maps every value of its input's dtype to itself (same dtype, a wider
    float, a wider integer, bool to anything, integers to a float whose mantissa holds them)."""
    src, dst = val(cast.args[0]).dtype, val(cast).dtype
    if src == dst or src == torch.bool:
        return True
    if src.is_floating_point and dst.is_floating_point:
        a, b = torch.finfo(src), torch.finfo(dst)
        return b.max >= a.max and b.eps <= a.eps and b.tiny <= a.tiny
    if not src.is_floating_point and not src.is_complex and dst.is_floating_point:
        return torch.iinfo(src).bits <= _mantissa_bits(dst)
    if not (src.is_floating_point or dst.is_floating_point or src.is_complex or dst.is_complex):
        a, b = torch.iinfo(src), torch.iinfo(dst)
        return b.min <= a.min and b.max >= a.max
    return False


def skip_exact(node: fx.Node) -> fx.Node:
    """skip_pass_through through views and casts that keep every value only: a cast that rounds
    (fp32 -> fp16 before a top-k, a float cast to int) is where a match must look, not past it."""
    while is_op(node, *PASS_THROUGH) and (not is_op(node, *_CASTS) or keeps_values(node)):
        node = node.args[0]
    return node


def descendants(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node that (transitively) uses one of `roots`, the roots excluded."""
    return _reachable(roots, lambda n: n.users)


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node `node` (transitively) reads, itself excluded."""
    return _reachable([node], lambda n: n.all_input_nodes)


def _reachable(roots: Iterable[fx.Node], step) -> set[fx.Node]:
    seen, stack = set(), list(roots)
    while stack:
        for n in step(stack.pop()):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def erase_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes (in-place ops included) once nothing outside the set uses them."""
    pending = {n for n in nodes if not getattr(n, "_erased", False)}
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users:
                gm.graph.erase_node(node)
                pending.discard(node)
                changed = True
