"""The forward (noising) process: betas and everything derived from them, in float64.

Formulas follow DDPM (Ho et al. 2020) as registered by SD's `LatentDiffusion.register_schedule`
(CompVis/stable-diffusion ldm/models/diffusion/ddpm.py); `sd_buffers` gives exactly the 12
buffers an SD checkpoint stores, under the same names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.config import DiffusionConfig

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")

# Names (and order) of the schedule buffers inside SD checkpoints; checkpoint keys rely on them.
SD_BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete diffusion process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t = 0..T-1."""
    betas: Tensor                  # [T] float64
    alphas_cumprod: Tensor         # [T] abar_t = prod_{s<=t} (1 - beta_s)
    alphas_cumprod_prev: Tensor    # [T] abar_{t-1}, with abar_{-1} = 1

    @property
    def num_timesteps(self) -> int:
        """Number of training timesteps T."""
        return self.betas.shape[0]

    @property
    def alphas(self) -> Tensor:
        """Per-step 1 - beta_t."""
        return 1.0 - self.betas

    @property
    def sqrt_alphas_cumprod(self) -> Tensor:
        """Signal scale a_t = sqrt(abar_t)."""
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> Tensor:
        """Noise scale s_t = sqrt(1 - abar_t)."""
        return (1.0 - self.alphas_cumprod).sqrt()

    @property
    def sigmas(self) -> Tensor:
        """Variance-exploding noise level sigma_t = sqrt((1 - abar_t) / abar_t) (k-diffusion)."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def posterior_variance(self) -> Tensor:
        """Variance of q(x_{t-1} | x_t, x_0): beta_t (1 - abar_{t-1}) / (1 - abar_t) (DDPM eq. 7)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> Tensor:
        """log of the posterior variance, floored at 1e-20 as SD does (it is 0 at t=0)."""
        return self.posterior_variance.clamp(min=1e-20).log()

    @property
    def posterior_mean_coef1(self) -> Tensor:
        """Coefficient of x_0 in the posterior mean (DDPM eq. 7)."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> Tensor:
        """Coefficient of x_t in the posterior mean (DDPM eq. 7)."""
        return (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)


def make_betas(config: DiffusionConfig) -> Tensor:
    """The [T] float64 betas of `config.beta_schedule`."""
    n = config.num_timesteps
    if n < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {n}")
    kind = config.beta_schedule
    if kind == "linear":  # DDPM: linear in beta
        return torch.linspace(config.linear_start, config.linear_end, n, dtype=torch.float64)
    if kind == "scaled_linear":  # SD: linear in sqrt(beta) (SD's make_beta_schedule "linear")
        return torch.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5, n,
                              dtype=torch.float64) ** 2
    if kind == "cosine":  # improved DDPM eq. 17: abar(t) = f(t)/f(0), f = cos^2(((t/T + s)/(1 + s)) pi/2)
        s = config.cosine_s
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(0.0, 0.999)  # clipped to avoid a singularity at t=T
    raise ValueError(f"unknown beta_schedule {kind!r}; allowed: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift/scale sqrt(abar) so abar_T = 0 while abar_0 is unchanged (Lin et al. 2024, Alg. 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def schedule_from_betas(betas: Tensor) -> Schedule:
    """Build a Schedule from [T] betas (converted to float64 on the CPU)."""
    betas = betas.detach().to("cpu", torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return Schedule(betas=betas, alphas_cumprod=alphas_cumprod,
                    alphas_cumprod_prev=alphas_cumprod_prev)


def make_schedule(config: DiffusionConfig) -> Schedule:
    """The Schedule described by `config` (beta schedule, steps, optional zero terminal SNR)."""
    betas = make_betas(config)
    if config.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)


def sd_buffers(schedule: Schedule, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The 12 schedule buffers of an SD checkpoint, computed in float64 and cast to `dtype`."""
    abar = schedule.alphas_cumprod
    values = {
        "betas": schedule.betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": schedule.alphas_cumprod_prev,
        "sqrt_alphas_cumprod": schedule.sqrt_alphas_cumprod,
        "sqrt_one_minus_alphas_cumprod": schedule.sqrt_one_minus_alphas_cumprod,
        "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / abar - 1),
        "posterior_variance": schedule.posterior_variance,
        "posterior_log_variance_clipped": schedule.posterior_log_variance_clipped,
        "posterior_mean_coef1": schedule.posterior_mean_coef1,
        "posterior_mean_coef2": schedule.posterior_mean_coef2,
    }
    return {name: values[name].to(dtype) for name in SD_BUFFER_NAMES}


def schedule_from_sd_buffers(buffers: dict[str, Tensor]) -> Schedule:
    """Rebuild a Schedule from a checkpoint's `betas` buffer (the others are derived from it)."""
    if "betas" not in buffers:
        raise KeyError("schedule buffers lack 'betas'")
    return schedule_from_betas(buffers["betas"])
