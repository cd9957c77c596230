"""What an expert computes between its two projections, recognised by meaning rather than spelling.

An expert is down(unit(proj(x))) where proj is one projection [gate; up] (grouped GEMM, one
linear) or two (a gate linear and an up linear), and unit is elementwise. `recognise_unit` takes
the nodes from the projection output(s) to the down projection's input and

1. checks that they are elementwise or column selections of the projection outputs only (no
   other tensor enters: a learned scale or a norm inside the unit is not a foe:: unit), and that
   every cast keeps the values of the projection's dtype (widening, or back to it after widening:
   a round trip through float8, an integer or a narrower float is not the op's unit);
2. proposes the units foe::experts_swiglu computes (reference.expert_unit: silu with alpha,
   gelu, gelu_tanh gated; relu2 ungated) with the clamp limits, multipliers and offsets that
   appear as constants in those nodes, in every gate/up column layout (halves gate-first or
   up-first, interleaved gate/up as gpt-oss stores them);
3. runs the nodes themselves on random float64 inputs spanning several magnitudes (beyond any
   clamp) and keeps the first proposal that agrees to 1e-9.

So `F.silu(g) * u`, `g * torch.sigmoid(g) * u`, `act(g).mul_(u)` or a clamp spelled with
minimum/maximum are all the same unit. A candidate agreeing on random probes is not a proof;
translation validation of the whole rewrite (generic._convert_at) is the check that decides.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..kernels.reference import GATED_ACTIVATIONS, expert_unit
from .infra import PASS_THROUGH, ancestors, aten, descendants, is_op, val

# Elementwise ops a unit may use (in-place spellings included) and column selections.
_ELEMENTWISE = {getattr(aten, name).default for name in (
    "silu", "silu_", "gelu", "gelu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "erf", "relu", "relu_", "square",
    "neg", "exp", "clamp", "clamp_", "clamp_min", "clamp_max", "minimum", "maximum")} | {
    aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add_.Tensor, aten.add.Scalar,
    aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.div.Tensor, aten.pow.Tensor_Scalar}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default}
_SELECT = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, operator.getitem}
_CLAMPS = {aten.clamp.default, aten.clamp_.default, aten.clamp_min.default, aten.clamp_max.default}
LAYOUTS = ("halves", "halves_up_first", "interleaved", "interleaved_up_first")


@dataclass(frozen=True)
class Unit:
    """foe::experts_swiglu's unit arguments, and how the source lays out the gate and up columns."""

    activation: str = "silu"
    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0
    layout: str = "halves"  # of the projection's output columns (rows of the [2I, d] weight)

    def op_kwargs(self) -> dict:
        return dict(activation=self.activation, alpha=self.alpha, limit=self.limit, up_offset=self.up_offset)

    def describe(self) -> str:
        extras = [f"{k}={v}" for k, v, default in (("alpha", self.alpha, 1.0), ("limit", self.limit, None),
                                                    ("up_offset", self.up_offset, 0.0)) if v != default]
        layout = [] if self.layout == "halves" or self.activation not in GATED_ACTIVATIONS else [self.layout]
        return ", ".join([self.activation, *extras, *layout])


@dataclass
class ExpertMLP:
    """One expert written with linears: down(unit(gate_up(x))), gate_up as one linear or two (gate, up)."""

    x: fx.Node
    gate_up: tuple[fx.Node, ...]  # the projection weights, concatenated in this order by lowering
    gate_up_bias: tuple[fx.Node, ...] | None
    down: fx.Node
    down_bias: fx.Node | None
    unit: Unit
    gate_up_transposed: bool = False  # weights stored [in, out] (read as x @ W), not [out, in]
    down_transposed: bool = False


@dataclass(frozen=True)
class Linear:
    """A linear layer y = x W^T + b as the graph spells it: aten.linear(x, W, b), or x @ W with a
    2-D W computed from the model's weights alone (W = V.T: weight V; else W itself, stored
    transposed)."""

    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool


_TRANSPOSES = (aten.numpy_T.default, aten.t.default)


def as_linear(node) -> Linear | None:
    if is_op(node, aten.linear.default):
        return Linear(node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None, False)
    if not is_op(node, aten.matmul.default) or not isinstance(node.args[1], fx.Node):
        return None
    w = node.args[1]
    if val(w).dim() != 2 or any(a.op == "placeholder" for a in ancestors(w) | {w}):
        return None  # x @ activations (attention), or a weight computed from the inputs
    if is_op(w, *_TRANSPOSES) or (is_op(w, aten.transpose.int) and {w.args[1] % 2, w.args[2] % 2} == {0, 1}):
        return Linear(node.args[0], w.args[0], None, False)
    return Linear(node.args[0], w, None, True)


def match_expert_mlp(down_node: fx.Node) -> ExpertMLP | str | None:
    """The expert ending in the linear `down_node`; a reason when its unit or projections are not the
    op's; None when `down_node` is not a linear of a linear."""
    down = as_linear(down_node)
    if down is None:
        return None
    projections = _projections(down.x)
    if not projections or len(projections) > 2:
        return None if not projections else f"expert reads {len(projections)} projections (expected gate_up or gate, up)"
    linears = [as_linear(p) for p in projections]
    if len({_recomputation(p.x) for p in linears}) != 1:
        return "expert projections read different inputs"
    if len({p.bias is None for p in linears}) != 1:
        return "only some of the expert's projections have a bias"
    if len({p.transposed for p in linears}) != 1:
        return "the expert's gate and up weights are stored in different layouts ([out, in] and [in, out])"
    width = sum(val(p).shape[-1] for p in projections)
    unit = recognise_unit(projections, down.x, width)
    if isinstance(unit, str):
        return unit
    return ExpertMLP(linears[0].x, tuple(p.weight for p in linears),
                     None if linears[0].bias is None else tuple(p.bias for p in linears), down.weight,
                     down.bias, unit, linears[0].transposed, down.transposed)


def _recomputation(node: fx.Node):
    """What identifies the value of `node` up to recomputation: the same op on the same inputs
    (`h[token]` written once per projection) gives the same key."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or schema.is_mutable:
        return node
    return node.target, str(node.args), str(node.kwargs)


def _projections(unit_output: fx.Node) -> list[fx.Node]:
    """The linears whose outputs the unit ending at `unit_output` reads, in graph order."""
    return unit_sources(unit_output, lambda n: as_linear(n) is not None)


def unit_sources(unit_output: fx.Node, is_source) -> list[fx.Node]:
    """The nodes satisfying `is_source` whose outputs the unit ending at `unit_output` reads through
    elementwise ops, casts and column selections, in graph order."""
    found, stack, seen = set(), [unit_output], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_source(n):
            found.add(n)
        elif n.op == "call_function" and (n.target in _ELEMENTWISE | _CASTS | _SELECT or is_op(n, *PASS_THROUGH)):
            stack.extend(n.all_input_nodes)
    return [n for n in unit_output.graph.nodes if n in found]


def _bias_free_linear(node) -> bool:
    return is_op(node, aten.linear.default) and (len(node.args) < 3 or node.args[2] is None)


# Elementwise activations a dense gated MLP may apply to its gate (one node each in ATen).
GATE_ACTIVATIONS = (aten.silu.default, aten.gelu.default, aten.relu.default)


def match_gated_mlp(down_linear: fx.Node):
    """linear(act(linear(x, Wg)) * linear(x, Wu), Wd), act one of GATE_ACTIVATIONS, all bias-free ->
    (x, act node, Wg, Wu, Wd), else None (the dense MLPs split_dense_mlps shards: spelled exactly
    so, since it rewrites that spelling)."""
    if not _bias_free_linear(down_linear):
        return None
    h = down_linear.args[0]
    if not is_op(h, aten.mul.Tensor):
        return None
    a, b = h.args
    act, up = (a, b) if is_op(a, *GATE_ACTIVATIONS) else (b, a)
    if not is_op(act, *GATE_ACTIVATIONS) or not _bias_free_linear(up):
        return None
    gate = act.args[0]
    if not _bias_free_linear(gate) or gate.args[0] is not up.args[0]:
        return None
    return gate.args[0], act, gate.args[1], up.args[1], down_linear.args[1]


def unit_nodes(inputs: list[fx.Node], output: fx.Node) -> list[fx.Node]:
    """The nodes from `inputs` (exclusive) to `output` (inclusive), in graph order."""
    between = (descendants(inputs) & (ancestors(output) | {output})) - set(inputs)
    return [n for n in output.graph.nodes if n in between]


def recognise_unit(inputs: list[fx.Node], output: fx.Node, width: int) -> Unit | str:
    """The Unit computing `output` from the concatenated columns of `inputs` (`width` in all); else why not."""
    nodes = unit_nodes(inputs, output)
    inside = set(nodes) | set(inputs)
    for n in nodes:
        if n.op != "call_function" or not (n.target in _ELEMENTWISE | _CASTS | _SELECT or is_op(n, *PASS_THROUGH)):
            return f"expert unit computes {_name(n)} ({n.name}), which is not elementwise"
        foreign = [a for a in n.all_input_nodes if a not in inside]
        if foreign:
            return f"expert unit reads {foreign[0].name} besides the projection ({_name(n)} {n.name})"
    source_dtypes = {val(i).dtype for i in inputs}
    lossy = [n for n in nodes if n.target in _CASTS and not holds_values(val(n).dtype, source_dtypes)]
    if lossy:
        return (f"expert unit casts to {val(lossy[0]).dtype} ({lossy[0].name}), which does not hold every value of "
                f"its projection's {', '.join(sorted(str(d) for d in source_dtypes))} output")
    out_width = val(output).shape[-1]
    gated = out_width * 2 == width
    if not gated and out_width != width:
        return f"expert unit maps {width} projection columns to {out_width} (expected {width} or {width // 2})"
    probe = _probe(width, _constants(nodes))
    try:
        got = _run(nodes, inputs, output, probe)
    except Exception as error:  # noqa: BLE001 - a unit we cannot evaluate is not recognised
        return f"expert unit could not be evaluated on probe values ({type(error).__name__}: {error})"
    clamps = {abs(float(a)) for n in nodes if n.target in _CLAMPS for a in n.args[1:] if isinstance(a, (int, float))}
    for unit in _candidates(nodes, gated):
        if clamps and unit.limit not in clamps:
            continue  # a clamp in the source must be the unit's limit, whatever the probes show
        want = expert_unit(_gate_first(probe, unit.layout), **unit.op_kwargs())
        if want.shape == got.shape and torch.allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True):
            return unit
    ops = sorted({_name(n) for n in nodes if n.target in _ELEMENTWISE})
    return (f"expert unit computes {', '.join(ops) or 'no activation'}, which matches none of foe::experts_swiglu's "
            "units (silu with alpha / gelu / gelu_tanh gated, with an optional clamp limit and up offset; relu2 ungated)")


def maps_zero_to_zero(inputs: list[fx.Node], output: fx.Node, width: int) -> bool:
    """Whether the unit from `inputs` to `output` (recognised by recognise_unit) gives exactly 0 for a projection
    output of 0: then a bias-free expert's output for the input 0 is exactly 0."""
    zero = torch.zeros(1, width, dtype=torch.float64)
    return bool((_run(unit_nodes(inputs, output), inputs, output, zero) == 0).all())


def _gate_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout.startswith("interleaved"):
        gate, up = t[..., 0::2], t[..., 1::2]
    else:
        gate, up = t.chunk(2, dim=-1)
    return torch.cat([up, gate] if layout.endswith("up_first") else [gate, up], dim=-1)


def _probe(width: int, constants: set[float]) -> torch.Tensor:
    """Random float64 rows whose magnitudes range from 0.01 to 100, then rows around every constant c
    the unit uses (c, c +- 1e-3 |c|, +-2 |c|, both signs), so that a clamp at any limit is exercised."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 2, 24, dtype=torch.float64).unsqueeze(1)
    rows = [torch.randn(24, width, generator=g, dtype=torch.float64) * scales]
    for c in sorted(abs(c) for c in constants if c and math.isfinite(c)):
        for value in (c, c * (1 - 1e-3), c * (1 + 1e-3), 2 * c):
            signs = torch.randint(0, 2, (2, width), generator=g, dtype=torch.float64) * 2 - 1
            rows.append(signs * value)
    return torch.cat(rows)


def _constants(nodes: list[fx.Node]) -> set[float]:
    return {float(a) for n in nodes for a in n.args if isinstance(a, (int, float)) and not isinstance(a, bool)}


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def holds_values(dtype: torch.dtype, sources) -> bool:
    """Whether the floating `dtype` holds every value of each dtype in `sources` exactly: a cast to it then
    keeps values (widening, or back to the source's own dtype). float8, integer and narrower floats do not
    (nor does fp16 hold bf16, or bf16 fp16)."""
    return dtype in _FLOATS and all(s in _FLOATS and torch.promote_types(s, dtype) == dtype for s in sources)


def lossy_cast(nodes, dtype: torch.dtype) -> fx.Node | None:
    """The first of `nodes` that casts to a dtype not holding every value of `dtype` (None: none does)."""
    return next((n for n in nodes if is_op(n, *_CASTS) and not holds_values(val(n).dtype, {dtype})), None)


def _run(nodes: list[fx.Node], inputs: list[fx.Node], output: fx.Node, probe: torch.Tensor) -> torch.Tensor:
    """Evaluate `nodes` on `probe` split by columns across `inputs`; casts stay float64 (each keeps the
    projection dtype's values, checked by recognise_unit; its rounding of the arithmetic is measured by translation
    validation)."""
    widths = [val(i).shape[-1] for i in inputs]
    env: dict[fx.Node, object] = dict(zip(inputs, (p.clone() for p in probe.split(widths, dim=-1))))
    for n in nodes:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
        env[n] = args[0] if n.target in _CASTS else n.target(*args, **kwargs)
    return env[output]


def _candidates(nodes: list[fx.Node], gated: bool):
    """Units to try, simplest first, with the constants the nodes use as limit, alpha and up offset."""
    if not gated:
        yield Unit("relu2")
        return
    limits, factors, offsets = {None}, {1.0}, {0.0}
    for n in nodes:
        numbers = [a for a in n.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if n.target in _CLAMPS:
            limits |= {abs(float(a)) for a in numbers}
        elif n.target in (aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.div.Tensor):
            factors |= {float(a) for a in numbers} | {1.0 / a for a in numbers if a and n.target is aten.div.Tensor}
        elif n.target in (aten.add.Tensor, aten.add_.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
            sign = -1.0 if n.target in (aten.sub.Tensor, aten.sub.Scalar) else 1.0
            offsets |= {sign * float(a) for a in numbers}
    limits = sorted(limits, key=lambda v: (v is not None, v or 0.0))
    finite = lambda values: sorted(v for v in values if math.isfinite(v))  # noqa: E731
    for limit, offset, layout in itertools.product(limits, finite(offsets), LAYOUTS):
        for activation in GATED_ACTIVATIONS:
            for alpha in finite(factors) if activation == "silu" else [1.0]:
                yield Unit(activation, alpha, limit, offset, layout)


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))
