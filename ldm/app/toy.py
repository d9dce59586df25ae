"""A 2-D toy: a Gaussian mixture, its exact score under the VP forward process, and a small MLP
denoiser trained on it, sampled with the toolkit's own samplers (points as [N, 2, 1, 1] latents)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm.config import DiffusionConfig
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers import sample as run_sampler
from ldm.diffusion.schedule import Schedule, make_schedule

TOY_TIMESTEPS = 1000


def toy_schedule() -> Schedule:
    """DDPM's linear schedule (1e-4..0.02, 1000 steps): it ends in noise for unit-scale data."""
    return make_schedule(DiffusionConfig(num_timesteps=TOY_TIMESTEPS, beta_schedule="linear",
                                         linear_start=1e-4, linear_end=0.02))


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic components: weights [K], means [K, 2], standard deviations [K]."""
    weights: Tensor = field(default_factory=lambda: torch.tensor([0.3, 0.3, 0.4]))
    means: Tensor = field(default_factory=lambda: torch.tensor([[-1.2, -0.8], [1.2, -0.8],
                                                                [0.0, 1.1]]))
    stds: Tensor = field(default_factory=lambda: torch.tensor([0.25, 0.25, 0.3]))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n points [n, 2]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, 2, generator=generator)
        return self.means[k] + self.stds[k, None] * eps

    def score(self, x: Tensor, abar: float) -> Tensor:
        """grad log q_t(x) [n, 2] of the noised mixture: component k becomes
        N(a mu_k, (a^2 std_k^2 + 1 - abar) I) with a = sqrt(abar)."""
        a = math.sqrt(abar)
        var = a * a * self.stds ** 2 + (1 - abar)                      # [K]
        diff = x[:, None, :] - a * self.means[None]                    # [n, K, 2]
        log_p = (self.weights.log() - diff.pow(2).sum(-1) / (2 * var) - torch.log(var))  # [n, K]
        resp = torch.softmax(log_p, dim=1)                             # posterior of component k
        return -(resp[..., None] * diff / var[None, :, None]).sum(1)


class ToyMLP(nn.Module):
    """eps-prediction MLP for 2-D points: (x_t, t) -> eps, t as sinusoidal features."""

    def __init__(self, width: int = 128, frequencies: int = 16) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.net = nn.Sequential(nn.Linear(2 + 2 * frequencies, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x [N, 2] or [N, 2, 1, 1] (the samplers' layout), t [N] -> eps of x's shape."""
        shape = x.shape
        points = x.reshape(shape[0], 2).float()
        freqs = torch.exp(torch.linspace(0, math.log(1000), self.frequencies, device=x.device))
        angles = t.float()[:, None] / TOY_TIMESTEPS * freqs[None] * 2
        features = torch.cat([points, angles.sin(), angles.cos()], dim=1)
        return self.net(features).reshape(shape).to(x.dtype)


def training_loss(model: nn.Module, x0: Tensor, schedule: Schedule,
                  generator: torch.Generator) -> Tensor:
    """DDPM's simple loss: || eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t) ||^2."""
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    abar = schedule.alphas_cumprod[t].float().view(-1, *([1] * (x0.ndim - 1)))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return (model(x_t, t) - eps).pow(2).mean()


def learned_score(model: nn.Module, x: Tensor, t: int, schedule: Schedule) -> Tensor:
    """The network's score estimate -eps_theta(x, t) / sqrt(1 - abar_t), [n, 2]."""
    s = math.sqrt(1 - float(schedule.alphas_cumprod[t]))
    with torch.no_grad():
        eps = model(x, torch.full((x.shape[0],), t))
    return -eps / s


def sample_paths(model: nn.Module, schedule: Schedule, sampler: str, steps: int, n: int,
                 seed: int, eta: float | None = None) -> Tensor:
    """[steps + 1, n, 2]: x_T and the latent after each step of `sampler` (ddpm, ddim, ...)."""
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 2, 1, 1, generator=generator)
    path = [x_T.reshape(n, 2)]
    denoiser = Denoiser(model=lambda x, t: model(x, t))
    with torch.no_grad():
        run_sampler(sampler, denoiser, x_T, schedule, steps, eta=eta, generator=generator,
                    callback=lambda i, x, d: path.append(x.reshape(n, 2).clone()))
    return torch.stack(path)
