"""Which timesteps (or noise levels sigma) a sampler visits, highest noise first."""
from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.schedule import Schedule

SPACINGS = ("uniform", "leading", "trailing", "linspace")

# Smallest alpha_bar used for sigma samplers when the schedule reaches zero terminal SNR
# (sigma would be infinite); diffusers uses the same floor for its Euler schedulers.
MIN_ALPHA_BAR = 2.0 ** -24


def check_steps(steps: int, num_timesteps: int) -> None:
    """Reject a step count outside 1..num_timesteps with one clear message."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in 1..{num_timesteps} (the training steps), "
                         f"got {steps!r}")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """int64 timesteps, descending; exactly `steps` of them except for `uniform`.

    uniform:  SD's DDIM reference, range(0, T, T // S) + 1 (make_ddim_timesteps in
              ldm/modules/diffusionmodules/util.py): ceil(T / (T // S)) timesteps, which is more
              than S whenever S does not divide T (13 for S = 12, 16 for S = 15); the +1 is
              dropped when it would step past T - 1 (T // S = 1, where the reference indexes
              past the end of alphas_cumprod).
    leading:  S of range(0, T, T // S) (Lin et al. 2024, table 2).
    trailing: round(arange(T, 0, -T / S)) - 1, always including T - 1.
    linspace: round(linspace(0, T - 1, S)).
    """
    check_steps(steps, num_timesteps)
    n = num_timesteps
    if spacing == "uniform":
        t = torch.arange(0, n, n // steps, dtype=torch.int64)
        if t[-1] + 1 < n:
            t = t + 1
    elif spacing == "leading":
        t = torch.arange(steps, dtype=torch.int64) * (n // steps)
    elif spacing == "trailing":
        t = torch.round(torch.arange(n, 0, -n / steps, dtype=torch.float64)).to(torch.int64) - 1
        t = t[:steps].flip(0)
    elif spacing == "linspace":
        t = torch.round(torch.linspace(0, n - 1, steps, dtype=torch.float64)).to(torch.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    return t.flip(0)


def log_sigmas(schedule: Schedule) -> Tensor:
    """[T] float64 log sigma_t, sigma_t = sqrt((1 - abar_t) / abar_t), abar floored at MIN_ALPHA_BAR."""
    abar = schedule.alphas_cumprod.clamp(min=MIN_ALPHA_BAR)
    return 0.5 * (torch.log1p(-abar) - torch.log(abar))


def t_to_sigma(schedule: Schedule, t: Tensor) -> Tensor:
    """sigma at a fractional timestep, interpolating log sigma (k-diffusion DiscreteSchedule)."""
    table = log_sigmas(schedule)
    t = t.to(torch.float64)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * table[low] + w * table[high]).exp()


def sigma_to_t(schedule: Schedule, sigma: Tensor) -> Tensor:
    """Fractional timestep of a sigma, the inverse of t_to_sigma (k-diffusion DiscreteSchedule)."""
    table = log_sigmas(schedule)
    log_sigma = sigma.to(torch.float64).log()
    # Index of the last table entry not above log_sigma (table ascends with t).
    low = (log_sigma[None, :] >= table[:, None]).cumsum(0).argmax(0).clamp(max=table.shape[0] - 2)
    w = ((table[low] - log_sigma) / (table[low] - table[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """[steps] float64 sigmas spaced as Karras et al. 2022 eq. 5 (k-diffusion get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def sampling_sigmas(schedule: Schedule, steps: int, karras: bool = False) -> tuple[Tensor, Tensor]:
    """(timesteps [steps] float64, sigmas [steps + 1] float64 ending in 0) for sigma samplers.

    Default spacing is k-diffusion's: t = linspace(T - 1, 0, S) with interpolated log sigma.
    """
    check_steps(steps, schedule.num_timesteps)
    if karras:
        table = log_sigmas(schedule).exp()
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
        t = sigma_to_t(schedule, sigmas)
    else:
        t = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64)
        sigmas = t_to_sigma(schedule, t)
    return t, torch.cat([sigmas, sigmas.new_zeros(1)])
