"""Predicted forward latency of EP (MoE) vs FoE from the paper's per-layer volumes (comm.py).

Per layer, T tokens on every rank, d hidden, b bytes per element, volumes in units of T*d:
    EP : t = max(c(T), a2a(T)) + (1 - rho) * min(c(T), a2a(T)) + 2*alpha
         a2a(T) = ep_volume(k, G) * T*d*b / (eta_a2a * B_eff)      dispatch + combine, B_eff below
    FoE: t = c(T) + ar(T) + alpha [+ alpha + a2a_intra(T) when G > H]
         ar(T) = all_reduce_volume(min(G, H)) * T*d*b / (eta_ar * B_ring)
    c(T) = c0 + c1*T       (per-layer compute, the same model for both: same FLOPs per rank)
rho is the share of EP's all-to-all hidden under compute (overlapped dispatch, as DeepEP-style
serving does); FoE's all-reduce sits between attention and MoE, so it is not overlapped.
Bandwidths are per GPU. An all-to-all over N nodes of g GPUs sends (g-1)/G of its bytes over
NVLink and (G-g)/G over the network, and takes the slower of the two; a ring all-reduce that
crosses nodes runs at the network bandwidth. Forward latency = layers * t.
Free parameters (c0, c1, alpha, eta_a2a, eta_ar, rho) are fitted to the paper's published
MoE/FoE forward-latency ratios (DESIGN.md) by least squares on log ratios, or given.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.optimize import least_squares

from ..comm import all_reduce_volume, ep_volume, foe_volume

# DESIGN.md: 8xH100, OLMoE-style 7B (d=2048, 16 layers, E=64, k=8, H=8), MoE/FoE latency ratio.
PAPER_TOKENS = (1, 1024, 2048, 4096, 8192, 24576)
PAPER_RATIOS = (1.04, 0.92, 1.30, 2.19, 3.59, 5.21)


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    intra_gbytes_s: float = 900.0  # NVLink, per GPU
    inter_gbytes_s: float = 50.0  # 400 Gb/s InfiniBand, per GPU

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ModelDims:
    hidden: int = 2048
    layers: int = 16
    top_k: int = 8
    groups: int = 8
    bytes_per_element: int = 2  # bf16


@dataclass(frozen=True)
class Params:
    c0: float = 50e-6  # s: per-layer compute independent of T (launches, weights streamed)
    c1: float = 20e-9  # s per token: per-layer compute
    alpha: float = 20e-6  # s: latency of one collective call
    eta_a2a: float = 0.5  # achieved / nominal bandwidth, all-to-all
    eta_ar: float = 0.5  # achieved / nominal bandwidth, all-reduce
    rho: float = 0.0  # share of EP's all-to-all overlapped with compute


FIT_NAMES = ("c0", "c1", "alpha", "eta_a2a", "eta_ar", "rho")
# NOTE: 4 parameters for 6 points; bandwidth efficiency stays at its given 0.5 (fitting it too
# trades off against c0/alpha without improving the fit: measured 2026-11-26, same max error).
DEFAULT_FREE = ("c0", "c1", "alpha", "rho")
_BOUNDS = dict(c0=(1e-7, 1e-2), c1=(1e-12, 1e-5), alpha=(1e-7, 1e-3), eta_a2a=(0.01, 1.0), eta_ar=(0.01, 1.0),
               rho=(0.0, 1.0))


def a2a_seconds(nbytes: float, ranks: int, cluster: Cluster) -> float:
    """An all-to-all over `ranks` consecutive GPUs: NVLink share and network share in parallel."""
    g = min(ranks, cluster.gpus_per_node)
    intra = nbytes * (g - 1) / max(ranks - 1, 1)
    inter = nbytes - intra
    return max(intra / (cluster.intra_gbytes_s * 1e9), inter / (cluster.inter_gbytes_s * 1e9))


def ring_seconds(nbytes: float, crosses_nodes: bool, cluster: Cluster) -> float:
    bw = cluster.inter_gbytes_s if crosses_nodes else cluster.intra_gbytes_s
    return nbytes / (bw * 1e9)


def layer_times(tokens: float, dims: ModelDims, cluster: Cluster, p: Params) -> tuple[float, float]:
    """(EP, FoE) seconds for one layer at `tokens` tokens."""
    G, H, k = cluster.gpus, dims.groups, dims.top_k
    unit = tokens * dims.hidden * dims.bytes_per_element  # bytes of T*d
    compute = p.c0 + p.c1 * tokens
    comm_ep = a2a_seconds(ep_volume(k, G) * unit, G, cluster) / p.eta_a2a
    ep = max(compute, comm_ep) + (1 - p.rho) * min(compute, comm_ep) + 2 * p.alpha
    ring_ranks = min(G, H)
    ring_nodes = math.ceil(G / cluster.gpus_per_node) if G <= H else min(cluster.nodes, H)
    ar = ring_seconds(all_reduce_volume(ring_ranks) * unit, ring_nodes > 1, cluster) / p.eta_ar
    foe = compute + ar + p.alpha
    if G > H:  # the intra-group all-to-all (paper's term), inside one node
        intra_volume = foe_volume(k, H, G) - all_reduce_volume(ring_ranks)
        foe += p.alpha + a2a_seconds(intra_volume * unit, G // H, cluster) / p.eta_a2a
    return ep, foe


def forward_latency(tokens: float, dims: ModelDims, cluster: Cluster, p: Params) -> tuple[float, float]:
    ep, foe = layer_times(tokens, dims, cluster, p)
    return dims.layers * ep, dims.layers * foe


def speedup(tokens: float, dims: ModelDims, cluster: Cluster, p: Params) -> float:
    """Predicted MoE(EP)/FoE forward latency ratio."""
    ep, foe = forward_latency(tokens, dims, cluster, p)
    return ep / foe


@dataclass
class Fit:
    params: Params
    tokens: tuple[int, ...]
    target: tuple[float, ...]
    predicted: tuple[float, ...]

    @property
    def max_rel_error(self) -> float:
        return max(abs(p / t - 1) for p, t in zip(self.predicted, self.target))

    def table(self) -> str:
        lines = ["tokens   paper  model   error"]
        lines += [f"{t:>6}  {a:5.2f}  {b:5.2f}  {100 * (b / a - 1):+5.1f}%"
                  for t, a, b in zip(self.tokens, self.target, self.predicted)]
        lines.append("fitted: " + ", ".join(f"{k}={v:.3g}" for k, v in asdict(self.params).items()))
        return "\n".join(lines)


def calibrate(dims: ModelDims = ModelDims(), cluster: Cluster = Cluster(), *,
              tokens: tuple[int, ...] = PAPER_TOKENS, ratios: tuple[float, ...] = PAPER_RATIOS,
              fixed: Params | None = None, free: tuple[str, ...] = DEFAULT_FREE) -> Fit:
    """Least-squares fit of the `free` parameters (log space) to MoE/FoE latency ratios."""
    unknown = set(free) - set(FIT_NAMES)
    if unknown:
        raise ValueError(f"cannot fit {sorted(unknown)}; free parameters are {FIT_NAMES}")
    if len(free) >= len(tokens):
        raise ValueError(f"{len(free)} free parameters for {len(tokens)} points: fix some (free=...)")
    base = fixed or Params()
    lo = np.array([_BOUNDS[n][0] for n in free])
    hi = np.array([_BOUNDS[n][1] for n in free])
    to_x = lambda p: np.array([getattr(p, n) for n in free])  # noqa: E731
    # rho lives on a linear scale (it may be 0); the others on a log scale.
    enc = lambda v, n: v if n == "rho" else math.log(v)  # noqa: E731
    dec = lambda v, n: v if n == "rho" else math.exp(v)  # noqa: E731

    def params_of(x: np.ndarray) -> Params:
        return replace(base, **{n: dec(v, n) for n, v in zip(free, x)})

    def residuals(x: np.ndarray) -> np.ndarray:
        p = params_of(x)
        return np.array([math.log(speedup(t, dims, cluster, p)) - math.log(r) for t, r in zip(tokens, ratios)])

    lo_x = np.array([enc(v, n) for v, n in zip(lo, free)])
    hi_x = np.array([enc(v, n) for v, n in zip(hi, free)])
    best = None
    for start in (base, replace(base, rho=0.9), replace(base, c1=2e-8, eta_a2a=0.1)):
        x0 = np.clip([enc(v, n) for v, n in zip(to_x(start), free)], lo_x + 1e-9, hi_x - 1e-9)
        sol = least_squares(residuals, x0, bounds=(lo_x, hi_x))
        if best is None or sol.cost < best.cost:
            best = sol
    p = params_of(best.x)
    return Fit(p, tuple(tokens), tuple(ratios), tuple(speedup(t, dims, cluster, p) for t in tokens))
