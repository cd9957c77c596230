"""Shapes, inputs, roofline units and the implementations the benchmark suite compares.

Layer shapes are DESIGN.md's (d, I, E, k). Routing is uniform random quota routing (k/H picks in
each of H expert blocks), fixed per (layer, T). Roofline units follow DESIGN.md:
floor = max(bytes / copy bandwidth, FLOPs / dense GEMM rate), with the expert bytes taken as the
*expected* number of experts touched under uniform routing, E * (1 - (1 - k/E)^T), times the
bytes of one expert; achieved GB/s uses the experts actually touched by the generated routing.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from foe_compile.kernels import dispatch, reference

GPU_LAYERS = {"qwen3": (2048, 768, 128, 8), "olmoe": (2048, 1024, 64, 8), "mixtral": (4096, 14336, 8, 2)}
GPU_TOKENS = (1, 8, 64, 512, 4096)
CPU_LAYERS = {"tiny": (64, 32, 6, 2)}  # E = 6: not a power of two
CPU_TOKENS = (1, 8, 64)
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    d: int
    I: int
    E: int
    k: int
    H: int
    dtype: torch.dtype
    device: str

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def expert_bytes(self, touched: float) -> float:
        return touched * 3 * self.I * self.d * self.itemsize

    def expected_touched(self, T: int) -> float:
        return self.E * (1 - (1 - self.k / self.E) ** T)

    def experts_flops(self, T: int) -> float:
        return 2.0 * T * self.k * 3 * self.I * self.d

    def route_flops(self, T: int) -> float:
        return 2.0 * T * self.d * self.E

    def route_bytes(self, T: int) -> float:
        # residual [1, T, d] + partials [H, T, d] + router [E, d] in; r, xn [T, d] out
        return (T * self.d * (self.H + 3) + self.E * self.d) * self.itemsize


@functools.lru_cache(maxsize=None)
def weights(layer: Layer) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gate_up [E, 2I, d], down [E, d, I], router [E, d], norm [d]) of one layer, cached."""
    gen = torch.Generator(device=layer.device).manual_seed(0)
    rand = lambda *s, scale: (torch.randn(*s, generator=gen, device=layer.device) * scale).to(layer.dtype)  # noqa: E731
    return (rand(layer.E, 2 * layer.I, layer.d, scale=layer.d ** -0.5), rand(layer.E, layer.d, layer.I, scale=layer.I ** -0.5),
            rand(layer.E, layer.d, scale=layer.d ** -0.5), rand(layer.d, scale=1.0) + 1)


@functools.lru_cache(maxsize=64)
def inputs(layer: Layer, T: int) -> dict[str, Tensor]:
    """Activations and a fixed uniform quota routing for T tokens (pairs/offsets precomputed)."""
    gen = torch.Generator(device=layer.device).manual_seed(T)
    rand = lambda *s: torch.randn(*s, generator=gen, device=layer.device).to(layer.dtype)  # noqa: E731
    scores = torch.rand(T, layer.E, generator=gen, device=layer.device)
    _, ids = reference.route(scores, layer.H, layer.k)
    pairs, offsets = reference.group_by_expert(ids, layer.E)
    w = torch.rand(T, layer.k, generator=gen, device=layer.device)
    return dict(x=rand(T, layer.d), ids=ids, weights=(w / w.sum(-1, keepdim=True)).to(layer.dtype), pairs=pairs,
                offsets=offsets, residual=rand(1, T, layer.d), partials=rand(layer.H, T, layer.d))


def touched(layer: Layer, T: int) -> int:
    return int((inputs(layer, T)["offsets"].diff() > 0).sum())


# ---- transformers' grouped_mm experts path (sort + two grouped_mm + scatter), called as is ----

class HFExperts(torch.nn.Module):
    """The attributes transformers' `grouped_mm_experts_forward` reads from its experts module."""

    def __init__(self, gate_up: Tensor, down: Tensor):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down
        self.num_experts = gate_up.shape[0]
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.act_fn = F.silu

    def _apply_gate(self, gate_up_out: Tensor) -> Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def hf_router(residual: Tensor, partials: Tensor, norm: Tensor, router: Tensor, H: int, k: int):
    """The plain-PyTorch route of a transformers MoE block (+ FoE's mean over groups): no sort."""
    r = (residual + partials).mean(0)
    xn = reference.rms_norm(r, norm, EPS)
    probs = torch.softmax(F.linear(xn, router).float(), dim=-1)
    _, ids = reference.route(probs, H, k)
    return r, xn, ids, reference.routing_weights(probs, ids, True, xn.dtype)


# ---- the implementations: name -> callable() on one (layer, T), or None when unavailable ------

def experts_impls(layer: Layer, T: int) -> dict[str, object]:
    gate_up, down, _, _ = weights(layer)
    a = inputs(layer, T)
    args = (a["x"], gate_up, down, a["ids"], a["weights"], a["pairs"], a["offsets"], layer.H)
    impls = {b: functools.partial(dispatch._KERNELS[("experts_swiglu", b)], *args)
             for b in ("triton", "native", "cupy") if dispatch.available("experts_swiglu", b, layer.device)}
    if layer.device == "cpu":
        impls["reference"] = functools.partial(reference.experts_swiglu, *args)
    if layer.H == 1:
        from transformers.integrations.moe import grouped_mm_experts_forward
        impls["grouped_mm"] = functools.partial(grouped_mm_experts_forward, HFExperts(gate_up, down), a["x"], a["ids"],
                                                a["weights"])
    return impls


def route_impls(layer: Layer, T: int) -> dict[str, object]:
    _, _, router, norm = weights(layer)
    a = inputs(layer, T)
    args = (a["residual"], a["partials"], norm, EPS, router, layer.H, layer.k, True)
    return {b: functools.partial(dispatch._KERNELS[("sum_route_dispatch", b)], *args)
            for b in ("reference", "native", "cupy", "triton")
            if dispatch.available("sum_route_dispatch", b, layer.device)}


def layer_impls(layer: Layer, T: int) -> dict[str, object]:
    """Route + experts. 'foe' = the foe:: ops with the auto backends; 'foe-triton' forces the
    Triton experts; 'grouped_mm' = the transformers router + its grouped_mm experts path."""
    gate_up, down, router, norm = weights(layer)
    a = inputs(layer, T)

    def foe(backend: str | None) -> Tensor:
        r, xn, ids, w, pairs, offsets = torch.ops.foe.sum_route_dispatch(a["residual"], a["partials"], norm, EPS,
                                                                         router, layer.H, layer.k, True)
        if backend is None:
            return torch.ops.foe.experts_swiglu(xn, gate_up, down, ids, w, pairs, offsets, layer.H)
        return dispatch._KERNELS[("experts_swiglu", backend)](xn, gate_up, down, ids, w, pairs, offsets, layer.H)

    impls = {"foe": functools.partial(foe, None)}
    if dispatch.available("experts_swiglu", "triton", layer.device):
        impls["foe-triton"] = functools.partial(foe, "triton")
    if layer.H == 1:
        from transformers.integrations.moe import grouped_mm_experts_forward
        experts = HFExperts(gate_up, down)

        def hf() -> Tensor:
            _, xn, ids, w = hf_router(a["residual"], a["partials"], norm, router, layer.H, layer.k)
            return grouped_mm_experts_forward(experts, xn, ids, w)

        impls["grouped_mm"] = hf
    return impls


def config_sources(layers: list[Layer]) -> dict[str, str]:
    """Which launch-config file the Triton experts use for each layer, or the fallback rule."""
    from foe_compile.kernels import launch_configs as lc
    out = {}
    for layer in layers:
        name = lc.config_filename(layer.E, layer.I, layer.d, layer.dtype, lc.device_name(torch.device(layer.device)))
        found = [str(folder / name) for folder in lc._search_dirs() if (folder / name).is_file()]
        out[layer.name] = found[0] if found else f"fallback rule (no {name})"
    return out


def backend_names() -> dict[str, str]:
    """Which backend "auto" picks for each op on this run's device (recorded with the rows)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {op: dispatch.choose(op, device) for op in dispatch.OPS}
