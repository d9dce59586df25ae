"""Samplers as pure functions over a Denoiser (k-diffusion style): one function per sampler.

Every sampler precomputes its per-step coefficient rows as one tensor on x's device, then loops
calling the network and the fused update `sampler_step` (guidance, parameterisation and update
in one op); no host scalars or syncs inside a step, so a loop can be captured in a CUDA graph.

Common signature: sample_x(denoiser, x, schedule, steps, *, eta=None, start=None, hook=None,
noise=None, generator=None, callback=None) -> final latent. The timesteps a sampler visits for
`steps` are `visited_timesteps` (SD's uniform DDIM spacing can give more than `steps`).
start: None to begin from the start noise x_T; an index k to run only the plan's steps k.. on a
latent x already noised to step k's level (editing: img2img, inpainting, hires fix).
hook(i, x) -> x: applied to the latent before step i and, with i = number of steps run, to the
final latent (inpainting's latent blending). `noise` [run steps, *x.shape] supplies the per-step
standard normal noise of stochastic samplers (else it is drawn from `generator`);
`callback(i, x, denoised)` sees the latent after step i and that step's denoised estimate.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.coefficients import (PLMS_WEIGHTS, ddim_coefficients,
                                        ddim_inversion_coefficients, ddpm_coefficients,
                                        dpmpp_2m_coefficients, euler_coefficients,
                                        plms_coefficients, vp_from_sigma)
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.noise import Generators, randn
from ldm.diffusion.schedule import Schedule
from ldm.diffusion.tables import to_device
from ldm.diffusion.timesteps import SPACINGS, check_steps, sampling_sigmas, spaced_timesteps
from ldm.kernels.sampler_step import (COEFF_A, COEFF_NOISE, COEFF_PREV, COEFF_S, COEFF_X,
                                      sampler_step)
from ldm.prediction import PredictionType, eps_from_x0

Callback = Callable[[int, Tensor, Tensor], None]
Hook = Callable[[int, Tensor], Tensor]  # (step index, latent) -> latent


def run_from(plan_length: int, start: int | None) -> int:
    """First plan index a run visits; rejects a start outside 0..plan_length - 1."""
    if start is None:
        return 0
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < plan_length:
        raise ValueError(f"start must be an integer in 0..{plan_length - 1} (the sampler visits "
                         f"{plan_length} timesteps), got {start!r}")
    return start


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
              noise: Tensor | None, generator: Generators, callback: Callback | None,
              hook: Hook | None = None) -> Tensor:
    """The loop shared by single-evaluation, history-free samplers (DDPM, DDIM, Euler)."""
    _check_signal(denoiser, rows)
    next_noise = _step_noise(noise, generator, x, rows)
    coeffs = to_device(rows, x.device)
    t = to_device(timesteps, x.device)
    for i in range(rows.shape[0]):
        if hook is not None:
            x = hook(i, x)
        out = denoiser(x, _timestep(t, i, x.shape[0]))
        x, denoised = sampler_step(x, out, coeffs[i], next_noise(i), None,
                                   denoiser.prediction_type, denoiser.learned_variance)
        if callback is not None:
            callback(i, x, denoised)
    return hook(rows.shape[0], x) if hook is not None else x


def sample_ddim(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                eta: float | None = 0.0, spacing: str = "uniform", start: int | None = None,
                hook: Hook | None = None, noise: Tensor | None = None,
                generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """DDIM (Song et al. 2021): eta = 0 deterministic, eta = 1 DDPM-like; SD's DDIMSampler.

    With `start` it is SD's DDIMSampler.decode: the last steps of the same schedule (the
    previous alpha_bar of each step, and of the last one alpha_bar[0], are unchanged).
    """
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing)
    timesteps = timesteps[run_from(len(timesteps), start):]
    rows = ddim_coefficients(schedule, timesteps, eta or 0.0, denoiser.guidance_scale)
    return _run_rows(denoiser, x, timesteps, rows, noise, generator, callback, hook)


def sample_ddpm(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                eta: float | None = None, variance: str | None = None, spacing: str = "uniform",
                start: int | None = None, hook: Hook | None = None, noise: Tensor | None = None,
                generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020), respaced to `steps`; variance defaults to learned/fixed_small."""
    _check_eta("ddpm", eta)
    if variance is None:
        variance = "learned" if denoiser.learned_variance else "fixed_small"
    if variance == "learned" and not denoiser.learned_variance:
        raise ValueError("variance='learned' needs a denoiser with learned_variance=True")
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing)
    timesteps = timesteps[run_from(len(timesteps), start):]
    rows = ddpm_coefficients(schedule, timesteps, variance, denoiser.guidance_scale)
    return _run_rows(denoiser, x, timesteps, rows, noise, generator, callback, hook)


def sample_euler(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                 eta: float | None = None, karras: bool = False, start: int | None = None,
                 hook: Hook | None = None, noise: Tensor | None = None,
                 generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """Euler on the probability-flow ODE in sigma space (Karras et al. 2022, k-diffusion)."""
    _check_eta("euler", eta)
    return _sample_sigma_euler(denoiser, x, schedule, steps, 0.0, karras, start, hook, noise,
                               generator, callback)


def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                           eta: float | None = 1.0, karras: bool = False,
                           start: int | None = None, hook: Hook | None = None,
                           noise: Tensor | None = None, generator: Generators = None,
                           callback: Callback | None = None) -> Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral); eta scales the fresh noise."""
    eta = 1.0 if eta is None else eta
    return _sample_sigma_euler(denoiser, x, schedule, steps, eta, karras, start, hook, noise,
                               generator, callback)


def _sigma_plan(schedule: Schedule, steps: int, karras: bool,
                start: int | None) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas ending in 0) of a sigma sampler from plan index `start` on."""
    timesteps, sigmas = sampling_sigmas(schedule, steps, karras)
    first = run_from(len(timesteps), start)
    return timesteps[first:], sigmas[first:]


def _sample_sigma_euler(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, eta: float,
                        karras: bool, start: int | None, hook: Hook | None, noise: Tensor | None,
                        generator: Generators, callback: Callback | None) -> Tensor:
    """Shared body of Euler and Euler ancestral."""
    timesteps, sigmas = _sigma_plan(schedule, steps, karras, start)
    rows = euler_coefficients(sigmas, eta, denoiser.guidance_scale)
    if start is None:  # k-diffusion starts at x_ve = sigma_max * x_T, i.e. x = s_max * x_T in VP space
        x = x * rows[0, COEFF_S].item()
    return _run_rows(denoiser, x, timesteps.float(), rows, noise, generator, callback, hook)


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                    eta: float | None = None, karras: bool = False, start: int | None = None,
                    hook: Hook | None = None, noise: Tensor | None = None,
                    generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep on the previous denoised estimate."""
    _check_eta("dpmpp_2m", eta)
    timesteps, sigmas = _sigma_plan(schedule, steps, karras, start)
    rows = dpmpp_2m_coefficients(sigmas, denoiser.guidance_scale)
    if start is None:
        x = x * rows[0, COEFF_S].item()  # x_ve = sigma_max x_T, as k-diffusion starts
    coeffs, t = to_device(rows, x.device), to_device(timesteps.float(), x.device)
    old_denoised = torch.zeros_like(x)  # c_prev is 0 on the first step
    for i in range(len(timesteps)):
        if hook is not None:
            x = hook(i, x)
        out = denoiser(x, _timestep(t, i, x.shape[0]))
        x, old_denoised = sampler_step(x, out, coeffs[i], None, old_denoised,
                                       denoiser.prediction_type, denoiser.learned_variance)
        if callback is not None:
            callback(i, x, old_denoised)
    return hook(len(timesteps), x) if hook is not None else x


def sample_plms(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                eta: float | None = None, spacing: str = "uniform", start: int | None = None,
                hook: Hook | None = None, noise: Tensor | None = None,
                generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """PLMS / PNDM (Liu et al. 2022) as SD's PLMSSampler: pseudo improved Euler, then 2-4th order
    Adams-Bashforth on the eps history (which, with `start`, begins at the first step run)."""
    _check_eta("plms", eta)
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing)
    timesteps = timesteps[run_from(len(timesteps), start):]
    n = len(timesteps)
    rows, first = plms_coefficients(schedule, timesteps, denoiser.guidance_scale)
    _check_signal(denoiser, rows)
    coeffs, first = to_device(rows, x.device), to_device(first, x.device)
    t = to_device(timesteps, x.device)
    batch, kind, learned = x.shape[0], denoiser.prediction_type, denoiser.learned_variance
    history: list[Tensor] = []  # eps of earlier steps, newest first
    for i in range(n):
        if hook is not None:
            x = hook(i, x)
        out = denoiser(x, _timestep(t, i, batch))
        a, s = coeffs[i, COEFF_A], coeffs[i, COEFF_S]
        if i == 0:  # predictor (DDIM), then corrector with eps at the predicted point
            x_pred, x0 = sampler_step(x, out, coeffs[0], None, None, kind, learned)
            eps = eps_from_x0(x, x0, a, s)
            t_next = _timestep(t, min(1, n - 1), batch)
            prev = first[0] * x + first[1] * eps
            x_next, _ = sampler_step(x_pred, denoiser(x_pred, t_next), coeffs[n], None, prev,
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
    return hook(n, x) if hook is not None else x


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


# Samplers that take eta (> 0 adds fresh noise each step); the others are deterministic.
STOCHASTIC_SAMPLERS = ("ddim", "euler_a")


# Samplers that walk k-diffusion sigmas (value: Karras spacing); the others walk SD's DDIM
# timesteps (spaced_timesteps, uniform).
SIGMA_SAMPLERS = {"euler": False, "euler_a": False, "dpmpp_2m": False, "dpmpp_2m_karras": True}


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered as `name`; unknown names raise a ValueError listing all."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_spacing(name: str, spacing: str) -> None:
    """Timestep spacings other than SD's uniform grid apply to the timestep samplers only."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    if spacing != "uniform" and name in SIGMA_SAMPLERS:
        raise ValueError(f"sampler {name!r} walks its own sigmas; timestep spacing {spacing!r} "
                         f"needs a timestep sampler ({', '.join(n for n in SAMPLERS if n not in SIGMA_SAMPLERS)})")


def sample(name: str, denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
           eta: float | None = None, start: int | None = None, hook: Hook | None = None,
           noise: Tensor | None = None, generator: Generators = None,
           callback: Callback | None = None, spacing: str = "uniform") -> Tensor:
    """Run sampler `name` from x (the start noise x_T, or with `start` a latent at that plan
    index's level) for `steps` steps; returns the final latent. spacing: the timestep grid of
    the timestep samplers (ldm.diffusion.timesteps.spaced_timesteps)."""
    fn = get_sampler(name)
    check_steps(steps, schedule.num_timesteps)
    check_spacing(name, spacing)
    kwargs = {} if eta is None else {"eta": eta}
    if spacing != "uniform":
        kwargs["spacing"] = spacing
    return fn(denoiser, x, schedule, steps, start=start, hook=hook, noise=noise,
              generator=generator, callback=callback, **kwargs)


def visited_timesteps(name: str, schedule: Schedule, steps: int,
                      spacing: str = "uniform") -> Tensor:
    """The timesteps registered sampler `name` visits for `steps`, highest first (float for
    sigma samplers). Its length is the number of steps and callbacks of a whole run (PLMS
    evaluates the network once more, on its first step)."""
    get_sampler(name)
    check_steps(steps, schedule.num_timesteps)
    check_spacing(name, spacing)
    if name in SIGMA_SAMPLERS:
        return sampling_sigmas(schedule, steps, SIGMA_SAMPLERS[name])[0]
    return spaced_timesteps(schedule.num_timesteps, steps, spacing)


def step_levels(name: str, schedule: Schedule, steps: int,
                spacing: str = "uniform") -> tuple[Tensor, Tensor]:
    """(a, s) [n + 1] float64 with x = a x0 + s eps the latent's level before each of the n
    visited steps; entry n is the clean end (1, 0)."""
    if name in SIGMA_SAMPLERS:
        sigmas = sampling_sigmas(schedule, steps, SIGMA_SAMPLERS[name])[1]
        return vp_from_sigma(sigmas)  # sigma ends in 0: (1, 0)
    abar = schedule.alphas_cumprod[visited_timesteps(name, schedule, steps, spacing)]
    one, zero = abar.new_ones(1), abar.new_zeros(1)
    return torch.cat([abar.sqrt(), one]), torch.cat([(1 - abar).sqrt(), zero])


def encode_level(name: str, schedule: Schedule, steps: int, start: int,
                 spacing: str = "uniform") -> tuple[float, float]:
    """(a, s) to noise a clean latent to, a x0 + s eps, before running the plan from `start`.

    Timestep samplers follow SD's img2img: stochastic_encode noises to ddim_alphas[t_enc], one
    step above the first step DDIMSampler.decode runs (ddim_timesteps[t_enc - 1]); a run of the
    whole plan (start 0) starts at its first level. Sigma samplers start exactly at their first
    sigma, as k-diffusion img2img does.
    """
    a, s = step_levels(name, schedule, steps, spacing)
    index = run_from(len(a) - 1, start)
    if name not in SIGMA_SAMPLERS and index > 0:
        index -= 1
    return a[index].item(), s[index].item()
