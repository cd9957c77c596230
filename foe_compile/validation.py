"""Translation validation: a rewrite is kept only if it computes what the source computes.

The FX path runs the captured (unrewritten) graph and the rewritten one on the same sample
inputs (the capture inputs and random inputs of the captured shapes) and compares every tensor
output. The error measure is max |rewritten - source| / max |source| over all outputs; a
rewrite is exact when that is within the tolerance of the outputs' dtype (TOLERANCE), which
only allows for summation order and the fp32 router softmax the fused op always uses.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, fx

from .passes import run_passes
from .passes.matches import MOE_KEY

log = logging.getLogger(__name__)

# Max relative error allowed for an "exact" rewrite, per output dtype.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float64: 1e-10,
    # Reduced precision: the fused op accumulates in fp32 where the source may round per step, and
    # a near-tie in the router can then pick another expert for a token (one ulp of bf16 is 8e-3).
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}


def tolerance(outputs: Sequence[Tensor]) -> float:
    """The tolerance of the main (first floating) output's dtype (fp32's when there is none): a
    low-precision side output must not loosen the check on fp32 logits."""
    dtype = next((t.dtype for t in outputs if t.is_floating_point()), torch.float32)
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def tensor_leaves(out) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def sample_inputs(args: tuple, count: int = 2, seed: int = 0) -> list[tuple]:
    """The capture inputs plus `count` random inputs of the same shapes and dtypes: integer tensors
    (token ids) drawn from the range the example spans, floating tensors with its mean and std."""
    gen = torch.Generator().manual_seed(seed)
    samples = [tuple(args)]
    for _ in range(count):
        samples.append(tuple(_like(a, gen) for a in args))
    return samples


def _like(a, gen: torch.Generator):
    if not isinstance(a, Tensor) or a.numel() == 0:
        return a
    if a.dtype == torch.bool:
        return a.clone()  # masks: keep the user's pattern
    if not a.is_floating_point():
        lo, hi = int(a.min()), int(a.max())
        return torch.randint(lo, hi + 1, a.shape, generator=gen, dtype=a.dtype).to(a.device)
    std = float(a.float().std()) if a.numel() > 1 else 1.0
    noise = torch.randn(a.shape, generator=gen) * (std if std > 0 else 1.0) + float(a.float().mean())
    return noise.to(device=a.device, dtype=a.dtype)


@torch.no_grad()
def max_relative_error(candidate: Callable, reference_outputs: list[list[Tensor]], inputs: list[tuple]) -> float:
    """max over samples and outputs of max|candidate - reference| / max|reference| over the finite
    entries; inf on a shape or type mismatch, on NaN or +-inf where the reference has none (or
    another sign), and when the candidate raises (a rewrite that crashes is a failed rewrite)."""
    worst = 0.0
    for sample, ref in zip(inputs, reference_outputs):
        try:
            got = tensor_leaves(candidate(*sample))
        except Exception as err:  # noqa: BLE001 - any failure of the rewritten graph fails validation
            log.warning("a rewritten graph failed to run during validation: %s", err)
            return float("inf")
        if len(got) != len(ref):
            return float("inf")
        for g, r in zip(got, ref):
            if g.shape != r.shape:
                return float("inf")
            if not r.is_floating_point():
                if not torch.equal(g, r):
                    return float("inf")
                continue
            g, r = g.double(), r.double()
            finite = torch.isfinite(r)
            if not torch.equal(torch.isnan(g), torch.isnan(r)) or not torch.equal(g[torch.isinf(r)], r[torch.isinf(r)]) \
                    or not torch.isfinite(g[finite]).all():
                return float("inf")
            if not finite.any():
                continue
            scale, diff = r[finite].abs().max(), (g[finite] - r[finite]).abs().max()
            worst = max(worst, float(diff / scale) if scale > 0 else float(diff))
    return worst


def validated_exact_rewrite(captured: fx.GraphModule, num_groups: int | None, samples: list[tuple],
                     references: list[list[Tensor]], tol: float):
    """The exact rewrite of `captured`, with every block whose rewrite changes the outputs left as
    written: (graph, pass results, measured error, {block index: reason})."""
    def attempt(leave: dict[int, str]):
        gm = copy_graph(captured)
        results = run_passes(gm, num_groups, "exact", leave=leave)
        return gm, results, max_relative_error(gm, references, samples)

    gm, results, error = attempt({})
    if error <= tol:
        return gm, results, error, {}
    # Find the culprits: each block rewritten alone (the others left as written).
    count = len(gm.meta[MOE_KEY])  # `leave` indexes the matched blocks (refused ones are never rewritten)
    left = {}
    for i in range(count):
        alone, _, alone_error = attempt({j: "" for j in range(count) if j != i})
        if alone_error > tol:
            left[i] = (f"rewrite failed translation validation ({_failure(alone, samples[0], alone_error)} > "
                       f"{tol:.0e}); left as written")
    log.warning("translation validation undid %d MoE block rewrite(s): %s", len(left), left)
    gm, results, error = attempt(left)
    if error > tol:
        raise RuntimeError(f"internal error: the rewrite still differs from the source by {error:.2e} with every "
                           "failing block left as written; please report this model")
    return gm, results, error, left


def _failure(gm: fx.GraphModule, sample: tuple, error: float) -> str:
    """The measured error, or, when the rewritten graph raised, what it raised (first line)."""
    if error != float("inf"):
        return f"max relative error {error:.2e}"
    try:
        gm(*sample)
    except Exception as err:  # noqa: BLE001 - reported, not handled
        return f"the rewritten graph raised {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return "max relative error inf (an output's shape, NaN or infinity differs)"


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the captured graph that shares its weights (the passes rewrite the copy)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    return new
