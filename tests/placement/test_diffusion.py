import math

import pytest
import torch

from placement_compile.diffusion import (add_noise, alpha, ancestral_step, denoising_loss, predict_x0,
                                         sampling_times, sigma)
from placement_compile.guidance import GuidanceConfig
from placement_compile.model import CONFIGS, AttGNN, DenoiserInputs
from placement_compile.sampler import PlaceConfig, sample, select_best
from tests.placement.helpers import tiny_graph


def test_schedule_values():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(alpha(t), torch.tensor([1.0, math.sqrt(0.5), 0.0], dtype=torch.float64))
    torch.testing.assert_close(sigma(t), torch.tensor([0.0, math.sqrt(0.5), 1.0], dtype=torch.float64))
    torch.testing.assert_close(alpha(t) ** 2 + sigma(t) ** 2, torch.ones(3, dtype=torch.float64))
    times = sampling_times(1000)
    assert times.shape == (1000,)
    assert times[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert times[-1].item() == pytest.approx(1e-4, abs=1e-15)
    assert bool((times[1:] < times[:-1]).all())
    with pytest.raises(ValueError, match="at least one"):
        sampling_times(0)


def test_ancestral_step_keeps_the_marginal():
    # x_t ~ q(x_t | x0); one step with the true x0 must give x_s ~ N(alpha_s x0, sigma_s^2).
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 2), 0.3, dtype=torch.float64)
    t, s = 0.7, 0.4
    x_t = float(alpha(torch.tensor(t))) * x0 + float(sigma(torch.tensor(t))) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_s = ancestral_step(x_t, x0, t, s, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    assert x_s.mean().item() == pytest.approx(0.3 * math.cos(0.2 * math.pi), abs=3e-3)
    assert x_s.std().item() == pytest.approx(math.sin(0.2 * math.pi), abs=3e-3)
    torch.testing.assert_close(ancestral_step(x_t, x0, t, 0.0, torch.randn_like(x0)), x0)


def test_predict_x0_inverts_add_noise():
    x0, eps = torch.randn(2, 5, 2, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64)
    x_t = add_noise(x0, torch.full((2,), 0.3, dtype=torch.float64), eps, torch.zeros(5, dtype=torch.bool))
    torch.testing.assert_close(predict_x0(x_t, eps, 0.3), x0)


class _ConstantModel(torch.nn.Module):
    """eps_hat = value everywhere, to check which entries the loss reads."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x_t, t, inputs):
        return self.value.expand_as(x_t)


def test_loss_ignores_ports_and_ports_are_not_noised():
    graph = tiny_graph(num_macros=3, num_ports=2)
    inputs = DenoiserInputs.from_graph(graph)
    x0 = graph.positions.expand(4, -1, -1)
    noise = torch.randn(x0.shape)
    x_t = add_noise(x0, torch.rand(4), noise, graph.is_port)
    torch.testing.assert_close(x_t[:, graph.is_port], x0[:, graph.is_port], rtol=0, atol=0)
    value = torch.zeros(graph.num_nodes, 2)
    value[graph.is_port] = 1e6  # garbage on ports must not count
    loss = denoising_loss(_ConstantModel(value), inputs, x0, torch.rand(4), noise)
    torch.testing.assert_close(loss, (noise[:, ~graph.is_port] ** 2).mean())


def _sample(seed: int) -> torch.Tensor:
    graph = tiny_graph()
    torch.manual_seed(0)
    model = AttGNN(CONFIGS["small"]).eval()
    cfg = PlaceConfig(samples=3, steps=6, seed=seed, guidance=GuidanceConfig(steps=3), progress=False)
    x, seconds = sample(model, graph, cfg, torch.Generator().manual_seed(seed))
    assert set(seconds) == {"denoiser", "guidance"}
    return x


def test_sampler_reproducible_and_ports_fixed():
    graph = tiny_graph()
    a, b, c = _sample(1), _sample(1), _sample(2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == (3, graph.num_nodes, 2)
    ports = graph.positions[graph.is_port].expand(3, -1, -1)
    torch.testing.assert_close(a[:, graph.is_port], ports, rtol=0, atol=0)
    assert float(a.abs().max()) <= 2.0


def test_select_best_prefers_legality_then_hpwl():
    assert select_best([0.99, 1.0, 1.0], [1.0, 5.0, 3.0]) == 2
    assert select_best([0.9, 0.95], [1.0, 9.0]) == 1
