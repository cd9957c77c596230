"""Continuous-time cosine diffusion: schedule, eps-prediction loss and the ancestral step.

x_t = alpha(t) x_0 + sigma(t) eps with alpha(t) = cos(pi t / 2), sigma(t) = sin(pi t / 2), t in [0, 1].
Ports are never noised and never move; the loss ignores them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from placement_compile.model import AttGNN, DenoiserInputs

T_MAX, T_MIN = 1.0 - 1e-4, 1e-4
CLAMP = 2.0  # |x| bound after every sampling step


def alpha(t: Tensor) -> Tensor:
    """alpha(t) = cos(pi t / 2)."""
    return torch.cos(0.5 * math.pi * t)


def sigma(t: Tensor) -> Tensor:
    """sigma(t) = sin(pi t / 2)."""
    return torch.sin(0.5 * math.pi * t)


def sampling_times(num_steps: int) -> Tensor:
    """The num_steps sampling times linspace(1 - 1e-4, 1e-4), float64 [num_steps]."""
    if num_steps < 1:
        raise ValueError(f"need at least one diffusion step, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([T_MAX], dtype=torch.float64)
    return torch.linspace(T_MAX, T_MIN, num_steps, dtype=torch.float64)


def add_noise(x0: Tensor, t: Tensor, noise: Tensor, is_port: Tensor) -> Tensor:
    """x0, noise [B, V, 2], t [B], is_port [V] -> x_t [B, V, 2] with ports left at x0."""
    a, s = alpha(t).view(-1, 1, 1), sigma(t).view(-1, 1, 1)
    return torch.where(is_port.view(1, -1, 1), x0, a * x0 + s * noise)


def denoising_loss(model: AttGNN, inputs: DenoiserInputs, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Mean squared eps error over movable objects: x0, noise [B, V, 2], t [B] -> scalar."""
    movable = (~inputs.is_port).to(x0.dtype).view(1, -1, 1)
    count = movable.sum() * x0.shape[0] * x0.shape[2]
    if count == 0:
        raise ValueError("the circuit has no movable objects to train on")
    eps_hat = model(add_noise(x0, t, noise, inputs.is_port), t, inputs)
    return ((eps_hat - noise) ** 2 * movable).sum() / count


def predict_x0(x_t: Tensor, eps_hat: Tensor, t: float) -> Tensor:
    """x0_hat = (x_t - sigma(t) eps_hat) / alpha(t)."""
    tt = torch.tensor(t, dtype=torch.float64)
    return (x_t - float(sigma(tt)) * eps_hat) / float(alpha(tt))


def ancestral_step(x_t: Tensor, x0_hat: Tensor, t: float, s: float, noise: Tensor) -> Tensor:
    """One step t -> s < t of the posterior q(x_s | x_t, x0 = x0_hat); s = 0 returns x0_hat.

    With a_ts = a_t / a_s and v_ts = s_t^2 - a_ts^2 s_s^2:
    mean = a_ts s_s^2 / s_t^2 x_t + a_s v_ts / s_t^2 x0_hat, variance = v_ts s_s^2 / s_t^2.
    """
    tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    a_t, s_t, a_s, s_s = alpha(tt), sigma(tt), alpha(ss), sigma(ss)
    a_ts = a_t / a_s
    v_ts = s_t**2 - a_ts**2 * s_s**2
    mean = float(a_ts * s_s**2 / s_t**2) * x_t + float(a_s * v_ts / s_t**2) * x0_hat
    return mean + float((v_ts * s_s**2 / s_t**2).clamp(min=0).sqrt()) * noise
