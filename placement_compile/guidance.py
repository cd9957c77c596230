"""Guidance potentials and the guided x0 step ("backward universal guidance", Lee et al.).

Per diffusion step the predicted x0_hat [B, V, 2] is refined by m inner Adam steps on
alpha_b * phi_legality + w * phi_HPWL (per sample b), ports held fixed; alpha_b is a Lagrange
multiplier learned by dual ascent so that phi_legality approaches a small target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from placement_compile.graph import PlacementGraph
from placement_compile.metrics import hpwl_normalised

# Elements of one [B, rows, M] pairwise chunk (~64 MiB per fp32 temporary): bounds memory for big M.
PAIR_CHUNK_ELEMENTS = 1 << 24


def pair_rows(batch: int, m: int) -> int:
    """Rows i of the [B, rows, M] pairwise tensors computed at once."""
    return max(1, PAIR_CHUNK_ELEMENTS // max(batch * m, 1))


def pair_potential_reference(x: Tensor, sizes: Tensor, kappa: float) -> Tensor:
    """Mass-weighted pairwise overlap potential of movable objects: x [B, M, 2], sizes [M, 2] -> [B].

    delta_ij = |x_i - x_j| - (s_i + s_j) / 2 per axis; l_ij = sum_axis softmax(kappa delta) delta;
    phi = sum_{i != j} relu(-l_ij)^2 / 4 * m_j / (m_i + m_j), m = sqrt(w h). x_j is detached, so the
    gradient on x_i is the force on i alone: lighter objects move more. Plain autograd, dense.
    """
    M = x.shape[1]
    mass = sizes.prod(-1).clamp(min=0).sqrt()
    delta = (x.unsqueeze(2) - x.detach().unsqueeze(1)).abs() - (sizes.unsqueeze(1) + sizes) / 2
    gap = (F.softmax(kappa * delta, dim=-1) * delta).sum(-1)  # [B, M, M]
    weight = (mass / (mass.unsqueeze(1) + mass).clamp(min=1e-12)) * (1 - torch.eye(M, dtype=x.dtype, device=x.device))
    return (F.relu(-gap) ** 2 / 4 * weight).sum(dim=(1, 2))


class _PairPotential(torch.autograd.Function):
    """pair_potential_reference with its gradient computed in the same pass (analytic, chunked).

    With p_a = softmax_a(kappa delta) and l = sum_a p_a delta_a: dl/d delta_a = p_a (1 + kappa (delta_a - l)),
    and for two axes p_x = sigmoid(kappa (delta_x - delta_y)).
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: Tensor, kappa: float) -> Tensor:
        B, M, _ = x.shape
        mass = sizes.prod(-1).clamp(min=0).sqrt()  # [M]
        value, grad = x.new_zeros(B), torch.empty_like(x)
        step = pair_rows(B, M)
        for start in range(0, M, step):
            rows = slice(start, min(start + step, M))
            diff = x[:, rows].unsqueeze(2) - x.unsqueeze(1)  # [B, r, M, 2]
            delta = diff.abs() - (sizes[rows].unsqueeze(1) + sizes) / 2
            dx, dy = delta.unbind(-1)
            px = torch.sigmoid(kappa * (dx - dy))
            gap = dy + px * (dx - dy)  # [B, r, M]
            weight = mass / (mass[rows].unsqueeze(1) + mass).clamp(min=1e-12)  # [r, M]
            weight = weight * (torch.arange(start, rows.stop, device=x.device).unsqueeze(1) != torch.arange(M, device=x.device))
            pen = F.relu(-gap) * weight  # relu(-l) w
            value += (pen * F.relu(-gap)).sum(dim=(1, 2)) / 4
            coef = -pen / 2  # d(w relu(-l)^2 / 4) / dl
            sign = diff.sign()
            grad[:, rows, 0] = (coef * px * (1 + kappa * (dx - gap)) * sign[..., 0]).sum(-1)
            grad[:, rows, 1] = (coef * (1 - px) * (1 + kappa * (dy - gap)) * sign[..., 1]).sum(-1)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad_out.view(-1, 1, 1) * grad, None, None


def pair_potential(x: Tensor, sizes: Tensor, kappa: float) -> Tensor:
    """Same value and gradient as :func:`pair_potential_reference`, fused and chunked: [B, M, 2] -> [B]."""
    return _PairPotential.apply(x, sizes.to(x.dtype), float(kappa))


def boundary_potential(x: Tensor, sizes: Tensor) -> Tensor:
    """sum relu(|x| + s / 2 - 1)^2 / 2 over objects and axes: x [B, M, 2], sizes [M, 2] -> [B]."""
    return (F.relu(x.abs() + sizes / 2 - 1) ** 2 / 2).sum(dim=(1, 2))


def legality_potential(x: Tensor, sizes: Tensor, movable: Tensor, kappa: float) -> Tensor:
    """phi_legality of all objects x [B, V, 2] (ports, movable[v] = False, ignored) -> [B]."""
    xm, sm = x[:, movable], sizes[movable]
    return pair_potential(xm, sm, kappa) + boundary_potential(xm, sm)


def softmax_factor(t: float, kappa_min: float = 10.0, kappa_max: float = 20.0, t_end: float = 0.1) -> float:
    """kappa rises linearly from kappa_min at t = 1 to kappa_max at t = t_end, then stays."""
    frac = min(max((1.0 - t) / (1.0 - t_end), 0.0), 1.0)
    return kappa_min + (kappa_max - kappa_min) * frac


@dataclass(frozen=True)
class GuidanceConfig:
    steps: int = 20  # m inner Adam steps per diffusion step (0 disables guidance)
    lr: float = 8e-3
    betas: tuple[float, float] = (0.8, 0.99)
    hpwl_weight: float = 16e-4
    alpha_init: float = 0.0
    alpha_lr: float = 5e-4
    alpha_target: float = 1e-4
    alpha_max: float = 15.0
    alpha_t_max: float = 0.5  # the multiplier only learns for t below this
    kappa_min: float = 10.0
    kappa_max: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"guidance steps must be an integer >= 0 (0 disables guidance), got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.hpwl_weight) and self.hpwl_weight >= 0):
            raise ValueError(f"guidance lr must be > 0 and hpwl_weight >= 0 (finite), got {self.lr!r}, {self.hpwl_weight!r}")


class Guidance:
    """Stateful guided x0 refinement for one batch of B samples of one circuit.

    Holds the per-sample multiplier alpha [B] and its Adam optimiser across diffusion steps.
    """

    def __init__(self, graph: PlacementGraph, batch: int, cfg: GuidanceConfig) -> None:
        self.graph, self.cfg = graph, cfg
        self.movable = ~graph.is_port.bool()
        self.sizes = graph.sizes.float()
        self.alpha = torch.full((batch,), cfg.alpha_init, device=graph.sizes.device, requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.alpha], lr=cfg.alpha_lr)

    def potentials(self, x: Tensor, kappa: float) -> tuple[Tensor, Tensor]:
        """(phi_legality [B], phi_HPWL [B]) at positions x [B, V, 2]."""
        return legality_potential(x, self.sizes, self.movable, kappa), hpwl_normalised(self.graph, x)

    def refine(self, x0_hat: Tensor, t: float) -> Tensor:
        """m Adam steps on x0_hat [B, V, 2] (ports fixed) at diffusion time t -> refined x0 [B, V, 2]."""
        cfg = self.cfg
        if cfg.steps == 0 or not bool(self.movable.any()):
            return x0_hat
        kappa = softmax_factor(t, cfg.kappa_min, cfg.kappa_max)
        x = x0_hat.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas)
        fixed = (~self.movable).view(1, -1, 1)
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=False)
            legal, wire = self.potentials(x, kappa)
            alpha = self.alpha.detach()
            (alpha * legal + cfg.hpwl_weight * wire).sum().backward()
            x.grad.masked_fill_(fixed, 0.0)
            opt.step()
            if t < cfg.alpha_t_max:
                self.dual_step(legal.detach())
        return torch.where(fixed, x0_hat, x.detach())

    def dual_step(self, legal: Tensor) -> None:
        """Dual ascent on alpha [B]: gradient -(phi_legality - target), clipped to [0, alpha_max]."""
        self.alpha_opt.zero_grad(set_to_none=False)
        self.alpha.grad = -(legal - self.cfg.alpha_target)
        self.alpha_opt.step()
        with torch.no_grad():
            self.alpha.clamp_(0.0, self.cfg.alpha_max)
