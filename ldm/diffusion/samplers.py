"""Samplers as pure functions over a Denoiser (k-diffusion style): one function per sampler.

Every sampler precomputes its per-step coefficient rows as one tensor on x's device, then loops
calling the network and the fused update `sampler_step` (guidance, parameterisation and update
in one op); no host scalars or syncs inside a step, so a loop can be captured in a CUDA graph.

Common signature: sample_x(denoiser, x, schedule, steps, *, eta=None, noise=None, generator=None,
callback=None) -> final latent. `noise` [steps, *x.shape] supplies the per-step standard normal
noise of stochastic samplers (else it is drawn from `generator`); `callback(i, x, denoised)`
sees the latent after step i and that step's denoised estimate.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.cuda_graph import to_device  # capture-safe table upload
from ldm.diffusion.coefficients import (PLMS_WEIGHTS, ddim_coefficients,
                                        ddim_inversion_coefficients, ddpm_coefficients,
                                        dpmpp_2m_coefficients, euler_coefficients,
                                        plms_coefficients)
from ldm.diffusion.denoiser import Denoiser, eps_from_x0
from ldm.diffusion.noise import Generators, randn
from ldm.diffusion.schedule import Schedule
from ldm.diffusion.timesteps import check_steps, sampling_sigmas, spaced_timesteps
from ldm.kernels.sampler_step import (COEFF_A, COEFF_NOISE, COEFF_PREV, COEFF_S, COEFF_X,
                                      PredictionType, sampler_step)

Callback = Callable[[int, Tensor, Tensor], None]


def _check_eta(sampler: str, eta: float | None) -> None:
    """Deterministic samplers take no eta; say so rather than silently ignoring it."""
    if eta not in (None, 0, 0.0):
        raise ValueError(f"sampler {sampler!r} is deterministic and takes no eta (got {eta}); "
                         "use ddim or euler_a for stochastic sampling")


def _step_noise(noise: Tensor | None, generator: Generators, x: Tensor,
                rows: Tensor) -> Callable[[int], Tensor | None]:
    """Per-step noise: a slice of `noise`, a draw from `generator`, or None where unused."""
    steps = rows.shape[0]
    needed = (rows[:, COEFF_NOISE] != 0).tolist()  # decided on the host, before the loop
    if noise is not None:
        if tuple(noise.shape[1:]) != tuple(x.shape) or noise.shape[0] < steps:
            raise ValueError(f"noise must have shape [{steps}, {', '.join(map(str, x.shape))}], "
                             f"got {list(noise.shape)}")
        noise = noise.to(device=x.device, dtype=x.dtype)
        return lambda i: noise[i] if needed[i] else None
    if any(needed) and generator is None:
        raise ValueError("this sampler is stochastic: pass `noise` or a torch.Generator")
    # Drawn before the loop (same order as drawing per step), so no step touches a host RNG.
    drawn = {i: randn(x.shape, generator, x.device, x.dtype) for i in range(steps) if needed[i]}
    return drawn.get


def _check_signal(denoiser: Denoiser, rows: Tensor) -> None:
    """An eps prediction says nothing about x0 where alpha_bar = 0 (zero terminal SNR)."""
    if denoiser.prediction_type == PredictionType.EPS and bool((rows[:, COEFF_A] == 0).any()):
        raise ValueError("this schedule reaches zero terminal SNR (alpha_bar = 0) at a visited "
                         "timestep, where an eps-prediction model cannot denoise; use v or x0 "
                         "prediction, or a spacing that avoids t = T - 1")


def _timestep(values: Tensor, i: int, batch: int) -> Tensor:
    """Timestep i of a device tensor, broadcast to the batch (a view, no host sync)."""
    return values[i].expand(batch)


def _run_rows(denoiser: Denoiser, x: Tensor, timesteps: Tensor, rows: Tensor,
              noise: Tensor | None, generator: Generators, callback: Callback | None) -> Tensor:
    """The loop shared by single-evaluation, history-free samplers (DDPM, DDIM, Euler)."""
    _check_signal(denoiser, rows)
    next_noise = _step_noise(noise, generator, x, rows)
    coeffs = to_device(rows, x.device)
    t = to_device(timesteps, x.device)
    for i in range(rows.shape[0]):
        out = denoiser(x, _timestep(t, i, x.shape[0]))
        x, denoised = sampler_step(x, out, coeffs[i], next_noise(i), None,
                                   denoiser.prediction_type, denoiser.learned_variance)
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_ddim(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                eta: float | None = 0.0, spacing: str = "uniform", noise: Tensor | None = None,
                generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """DDIM (Song et al. 2021): eta = 0 deterministic, eta = 1 DDPM-like; SD's DDIMSampler."""
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing)
    rows = ddim_coefficients(schedule, timesteps, eta or 0.0, denoiser.guidance_scale)
    return _run_rows(denoiser, x, timesteps, rows, noise, generator, callback)


def sample_ddpm(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                eta: float | None = None, variance: str | None = None, spacing: str = "uniform",
                noise: Tensor | None = None, generator: Generators = None,
                callback: Callback | None = None) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020), respaced to `steps`; variance defaults to learned/fixed_small."""
    _check_eta("ddpm", eta)
    if variance is None:
        variance = "learned" if denoiser.learned_variance else "fixed_small"
    if variance == "learned" and not denoiser.learned_variance:
        raise ValueError("variance='learned' needs a denoiser with learned_variance=True")
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing)
    rows = ddpm_coefficients(schedule, timesteps, variance, denoiser.guidance_scale)
    return _run_rows(denoiser, x, timesteps, rows, noise, generator, callback)


def sample_euler(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                 eta: float | None = None, karras: bool = False, noise: Tensor | None = None,
                 generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """Euler on the probability-flow ODE in sigma space (Karras et al. 2022, k-diffusion)."""
    _check_eta("euler", eta)
    return _sample_sigma_euler(denoiser, x, schedule, steps, 0.0, karras, noise, generator, callback)


def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                           eta: float | None = 1.0, karras: bool = False,
                           noise: Tensor | None = None, generator: Generators = None,
                           callback: Callback | None = None) -> Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral); eta scales the fresh noise."""
    eta = 1.0 if eta is None else eta
    return _sample_sigma_euler(denoiser, x, schedule, steps, eta, karras, noise, generator, callback)


def _sample_sigma_euler(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, eta: float,
                        karras: bool, noise: Tensor | None, generator: Generators,
                        callback: Callback | None) -> Tensor:
    """Shared body of Euler and Euler ancestral."""
    timesteps, sigmas = sampling_sigmas(schedule, steps, karras)
    rows = euler_coefficients(sigmas, eta, denoiser.guidance_scale)
    # k-diffusion starts at x_ve = sigma_max * x_T, i.e. x = s_max * x_T in VP space.
    x = x * rows[0, COEFF_S].item()
    return _run_rows(denoiser, x, timesteps.float(), rows, noise, generator, callback)


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                    eta: float | None = None, karras: bool = False, noise: Tensor | None = None,
                    generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep on the previous denoised estimate."""
    _check_eta("dpmpp_2m", eta)
    timesteps, sigmas = sampling_sigmas(schedule, steps, karras)
    rows = dpmpp_2m_coefficients(sigmas, denoiser.guidance_scale)
    x = x * rows[0, COEFF_S].item()  # x_ve = sigma_max x_T, as k-diffusion starts
    coeffs, t = to_device(rows, x.device), to_device(timesteps.float(), x.device)
    old_denoised = torch.zeros_like(x)  # c_prev is 0 on the first step
    for i in range(steps):
        out = denoiser(x, _timestep(t, i, x.shape[0]))
        x, old_denoised = sampler_step(x, out, coeffs[i], None, old_denoised,
                                       denoiser.prediction_type, denoiser.learned_variance)
        if callback is not None:
            callback(i, x, old_denoised)
    return x


def sample_plms(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                eta: float | None = None, spacing: str = "uniform", noise: Tensor | None = None,
                generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """PLMS / PNDM (Liu et al. 2022) as SD's PLMSSampler: pseudo improved Euler, then 2-4th order
    Adams-Bashforth on the eps history."""
    _check_eta("plms", eta)
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing)
    rows, first = plms_coefficients(schedule, timesteps, denoiser.guidance_scale)
    _check_signal(denoiser, rows)
    coeffs, first = to_device(rows, x.device), to_device(first, x.device)
    t = to_device(timesteps, x.device)
    batch, kind, learned = x.shape[0], denoiser.prediction_type, denoiser.learned_variance
    history: list[Tensor] = []  # eps of earlier steps, newest first
    for i in range(steps):
        out = denoiser(x, _timestep(t, i, batch))
        a, s = coeffs[i, COEFF_A], coeffs[i, COEFF_S]
        if i == 0:  # predictor (DDIM), then corrector with eps at the predicted point
            x_pred, x0 = sampler_step(x, out, coeffs[0], None, None, kind, learned)
            eps = eps_from_x0(x, x0, a, s)
            t_next = _timestep(t, min(1, steps - 1), batch)
            prev = first[0] * x + first[1] * eps
            x_next, _ = sampler_step(x_pred, denoiser(x_pred, t_next), coeffs[steps], None, prev,
                                     kind, learned)
        else:
            weights = PLMS_WEIGHTS[min(i, 3)]
            prev = sum(w * e for w, e in zip(weights[1:], history))
            x_next, x0 = sampler_step(x, out, coeffs[i], None, prev, kind, learned)
            eps = eps_from_x0(x, x0, a, s)
        if callback is not None:  # SD reports x0 of the combined eps' = (x_next - A x) / B
            eps_combined = (x_next - _plms_a(coeffs, first, i) * x) / _plms_b(coeffs, first, i)
            callback(i, x_next, (x - s * eps_combined) / a)
        history = [eps, *history[:2]]
        x = x_next
    return x


def _plms_a(coeffs: Tensor, first: Tensor, i: int) -> Tensor:
    """Coefficient A of x in PLMS step i's DDIM transfer x_prev = A x + B eps'."""
    return first[0] if i == 0 else coeffs[i, COEFF_X]


def _plms_b(coeffs: Tensor, first: Tensor, i: int) -> Tensor:
    """Coefficient B of eps' in PLMS step i's DDIM transfer."""
    return 2 * first[1] if i == 0 else coeffs[i, COEFF_PREV]


def invert_ddim(denoiser: Denoiser, x0: Tensor, schedule: Schedule, steps: int, *,
                spacing: str = "uniform", callback: Callback | None = None) -> Tensor:
    """DDIM inversion: the eta = 0 update run backwards, from a clean latent to the x_T that
    sample_ddim with the same steps and spacing maps back to it (exactly as steps grow)."""
    targets = spaced_timesteps(schedule.num_timesteps, steps, spacing).flip(0)  # ascending
    # Mirror of sample_ddim, whose last step lands at t = 0 (alpha_bar[0]).
    timesteps = torch.cat([targets.new_zeros(1), targets[:-1]])
    rows = ddim_inversion_coefficients(schedule, timesteps, targets, denoiser.guidance_scale)
    return _run_rows(denoiser, x0, timesteps, rows, None, None, callback)


SamplerFn = Callable[..., Tensor]

SAMPLERS: dict[str, SamplerFn] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": functools.partial(sample_dpmpp_2m, karras=True),
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
}


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered as `name`; unknown names raise a ValueError listing all."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(name: str, denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
           eta: float | None = None, noise: Tensor | None = None, generator: Generators = None,
           callback: Callback | None = None) -> Tensor:
    """Run sampler `name` from x (the start noise x_T) for `steps` steps; returns the final latent."""
    fn = get_sampler(name)
    check_steps(steps, schedule.num_timesteps)
    kwargs = {} if eta is None else {"eta": eta}
    return fn(denoiser, x, schedule, steps, noise=noise, generator=generator, callback=callback,
              **kwargs)
