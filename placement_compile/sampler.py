"""Batched end-to-end macro placement: guided ancestral sampling, legalization, best-of-B.

Example::

    model = load_checkpoint("placement_compile/checkpoints/small.pt")
    result = place(model, macro_graph, PlaceConfig(samples=8, steps=100))
    result.positions  # [V, 2] normalised centres of the chosen sample
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from placement_compile.diffusion import CLAMP, ancestral_step, predict_x0, sampling_times
from placement_compile.graph import PlacementGraph
from placement_compile.guidance import Guidance, GuidanceConfig
from placement_compile.legalizer import LegalizerConfig, legalize
from placement_compile.metrics import hpwl_normalised, legality_score
from placement_compile.model import AttGNN, DenoiserInputs


@dataclass(frozen=True)
class PlaceConfig:
    samples: int = 8  # B candidates sampled in one batch
    steps: int = 1000  # diffusion steps
    seed: int = 0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    legalizer: LegalizerConfig = field(default_factory=LegalizerConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"diffusion steps must be an integer >= 1, got {self.steps!r}")


@dataclass
class PlaceResult:
    positions: Tensor  # [V, 2] chosen sample, normalised centres
    samples: Tensor  # [B, V, 2] all legalized samples
    legality: list[float]  # per sample, shapely legality of the movable objects
    hpwl: list[float]  # per sample, normalised HPWL
    best: int  # index of the chosen sample
    seconds: dict[str, float]  # per phase: denoiser, guidance, legalizer, select
    legalizer_steps: int


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work finished (honest per-phase times on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def _denoise(model: AttGNN, x: Tensor, t: float, inputs: DenoiserInputs) -> Tensor:
    return model(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), inputs)


def sample(model: AttGNN, graph: PlacementGraph, cfg: PlaceConfig,
           generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """Guided ancestral sampling of cfg.samples placements -> ([B, V, 2], seconds per phase).

    Starts from N(0, I) (ports at their positions); each step predicts eps, forms x0_hat, refines it
    with guidance, samples x_s ~ q(x_s | x_t, x0_hat), clamps to [-2, 2] and resets the ports.
    """
    B, V = cfg.samples, graph.num_nodes
    inputs = DenoiserInputs.from_graph(graph)
    fixed = graph.is_port.bool().view(1, -1, 1)
    ports = graph.positions.float().unsqueeze(0)
    guide = Guidance(graph, B, cfg.guidance)
    x = torch.where(fixed, ports, torch.randn(B, V, 2, generator=generator).to(ports.device))
    times = sampling_times(cfg.steps).tolist() + [0.0]
    seconds = {"denoiser": 0.0, "guidance": 0.0}
    for t, s in tqdm(list(zip(times[:-1], times[1:])), desc="diffusion", disable=not cfg.progress, leave=False):
        tic = _clock(x.device)
        x0_hat = predict_x0(x, _denoise(model, x, t, inputs), t)
        toc = _clock(x.device)
        x0_hat = guide.refine(x0_hat, t)
        seconds["guidance"] += _clock(x.device) - toc
        noise = torch.randn(B, V, 2, generator=generator).to(x.device)  # CPU generator: same draws on any device
        x = ancestral_step(x, x0_hat, t, s, noise).clamp(-CLAMP, CLAMP)
        x = torch.where(fixed, ports, x)
        seconds["denoiser"] += toc - tic
    return x, seconds


def select_best(legality: list[float], hpwl: list[float], tol: float = 1e-9) -> int:
    """Index of the lowest-HPWL sample among those within tol of the best legality."""
    top = max(legality)
    candidates = [i for i, score in enumerate(legality) if score >= top - tol]
    return min(candidates, key=lambda i: hpwl[i])


def place(model: AttGNN, graph: PlacementGraph, cfg: PlaceConfig = PlaceConfig()) -> PlaceResult:
    """Sample, legalize and pick the best of cfg.samples placements of `graph` (seeded, CPU)."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    if not bool((~graph.is_port.bool()).any()):
        pos = graph.positions.float()
        return PlaceResult(pos, pos.expand(cfg.samples, -1, -1).clone(), [1.0] * cfg.samples,
                           [float(hpwl_normalised(graph, pos))] * cfg.samples, 0,
                           {"denoiser": 0.0, "guidance": 0.0, "legalizer": 0.0, "select": 0.0}, 0)
    x, seconds = sample(model, graph, cfg, generator)
    tic = _clock(x.device)
    x, legal_steps = legalize(graph, x, cfg.legalizer, progress=cfg.progress)
    seconds["legalizer"] = _clock(x.device) - tic
    tic = time.perf_counter()
    legality = [legality_score(graph, x[b]) for b in range(cfg.samples)]
    hpwl = hpwl_normalised(graph, x).tolist()
    best = select_best(legality, hpwl)
    seconds["select"] = time.perf_counter() - tic
    return PlaceResult(x[best], x, legality, hpwl, best, seconds, legal_steps)
