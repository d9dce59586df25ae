"""Per-step coefficient rows of each sampler for the fused step (ldm.kernels.sampler_step).

Every sampler runs in the variance-preserving space x_t = a x0 + s eps, a = sqrt(abar_t),
s = sqrt(1 - abar_t), and its update is one row of
x_next = c_x x + c_x0 x0 + c_eps eps + c_prev prev + c_noise * std * noise.
Sigma-space samplers (k-diffusion) use sigma = s / a, i.e. x_ve = x / a; their updates are
mapped to this space by x_next = a_next * x_ve_next. All maths in float64, rows in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.schedule import Schedule
from ldm.kernels.sampler_step import step_coefficients

DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned")


def vp_from_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(a, s) of the VP space for VE noise levels sigma (a = 1 / sqrt(1 + sigma^2), s = a sigma)."""
    a = torch.rsqrt(1 + sigma ** 2)
    return a, a * sigma


def ddim_coefficients(schedule: Schedule, timesteps: Tensor, eta: float,
                      guidance_scale: float = 1.0) -> Tensor:
    """DDIM rows (Song et al. 2021 eq. 12, sigma from eq. 16 times eta), SD's DDIMSampler layout.

    The previous alpha_bar of the last step is alpha_bar[0], as in SD's make_ddim_sampling_parameters.
    """
    abar = schedule.alphas_cumprod[timesteps]
    abar_prev = torch.cat([abar[1:], schedule.alphas_cumprod[:1]])
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    return step_coefficients(a=abar.sqrt(), s=(1 - abar).sqrt(), guidance_scale=guidance_scale,
                             c_x0=abar_prev.sqrt(), c_eps=(1 - abar_prev - sigma ** 2).clamp(min=0).sqrt(),
                             c_noise=sigma)


def ddim_inversion_coefficients(schedule: Schedule, timesteps: Tensor, targets: Tensor,
                                guidance_scale: float = 1.0) -> Tensor:
    """Rows of DDIM run backwards: read the network at timesteps[i], move to targets[i] (higher).

    x_next = a_next x0 + s_next eps, the eta = 0 update with the roles of t and t_prev swapped.
    """
    abar = schedule.alphas_cumprod[timesteps]
    abar_next = schedule.alphas_cumprod[targets]
    return step_coefficients(a=abar.sqrt(), s=(1 - abar).sqrt(), guidance_scale=guidance_scale,
                             c_x0=abar_next.sqrt(), c_eps=(1 - abar_next).sqrt())


def ddpm_coefficients(schedule: Schedule, timesteps: Tensor, variance: str,
                      guidance_scale: float = 1.0) -> Tensor:
    """Ancestral DDPM rows on a (possibly respaced) timestep sequence (DDPM eq. 6-7).

    Respacing as improved DDPM does: beta_i = 1 - abar_i / abar_prev_i on the visited steps; the
    last step goes to abar = 1 and adds no noise. Variances: fixed_small = posterior variance,
    fixed_large = beta, learned = interpolated in log space by the network (eq. 15).
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; allowed: {', '.join(DDPM_VARIANCES)}")
    abar = schedule.alphas_cumprod[timesteps]
    abar_prev = torch.cat([abar[1:], abar.new_ones(1)])
    beta = 1 - abar / abar_prev
    posterior_variance = beta * (1 - abar_prev) / (1 - abar)
    coef_x0 = beta * abar_prev.sqrt() / (1 - abar)
    coef_x = (1 - abar_prev) * (abar / abar_prev).sqrt() / (1 - abar)
    last = torch.zeros_like(beta, dtype=torch.bool)
    last[-1] = True
    logvar_min = logvar_max = 0.0
    if variance == "fixed_small":
        c_noise = posterior_variance.sqrt()
    elif variance == "fixed_large":
        c_noise = beta.sqrt()
    else:  # std = exp(0.5 * interpolated log variance), computed inside the step
        c_noise = torch.ones_like(beta)
        logvar_min = posterior_variance.clamp(min=1e-20).log()
        logvar_max = beta.log()
    c_noise = torch.where(last, torch.zeros_like(c_noise), c_noise)
    return step_coefficients(a=abar.sqrt(), s=(1 - abar).sqrt(), guidance_scale=guidance_scale,
                             c_x=coef_x, c_x0=coef_x0, c_noise=c_noise,
                             logvar_min=logvar_min, logvar_max=logvar_max)


def euler_coefficients(sigmas: Tensor, eta: float = 0.0, guidance_scale: float = 1.0) -> Tensor:
    """Euler (eta = 0) and Euler ancestral rows over sigmas [S + 1] (k-diffusion sample_euler*).

    Euler in sigma space, x_ve' = x_ve + (sigma' - sigma) (x_ve - x0) / sigma = x0 + sigma' eps;
    ancestral: x0 + sigma_down eps + sigma_up noise with k-diffusion's get_ancestral_step.
    """
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).clamp(min=0).sqrt()
    sigma_up = torch.minimum(sigma_next, eta * sigma_up)
    sigma_down = (sigma_next ** 2 - sigma_up ** 2).clamp(min=0).sqrt()
    a, s = vp_from_sigma(sigma)
    a_next, _ = vp_from_sigma(sigma_next)
    return step_coefficients(a=a, s=s, guidance_scale=guidance_scale, c_x0=a_next,
                             c_eps=a_next * sigma_down, c_noise=a_next * sigma_up)


def dpmpp_2m_coefficients(sigmas: Tensor, guidance_scale: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) rows over sigmas [S + 1] (Lu et al. 2022, alg. 2; k-diffusion sample_dpmpp_2m).

    x_ve' = (sigma'/sigma) x_ve + (1 - sigma'/sigma) D, D = (1 + 1/2r) x0 - (1/2r) x0_prev,
    r = h_prev / h, h = log(sigma / sigma'); first order on the first and the final step.
    In VP space: x' = (s'/s) x + a' (1 - sigma'/sigma) D; prev holds the previous step's x0.
    """
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    a, s = vp_from_sigma(sigma)
    a_next, s_next = vp_from_sigma(sigma_next)
    ratio = sigma_next / sigma
    h = torch.log(sigma / sigma_next)                      # inf on the final step (sigma' = 0)
    h_prev = torch.cat([h.new_full((1,), float("inf")), h[:-1]])
    inv_2r = torch.where(torch.isfinite(h) & torch.isfinite(h_prev), h / (2 * h_prev),
                         torch.zeros_like(h))
    weight = a_next * (1 - ratio)
    return step_coefficients(a=a, s=s, guidance_scale=guidance_scale, c_x=s_next / s,
                             c_x0=weight * (1 + inv_2r), c_prev=-weight * inv_2r)


def plms_coefficients(schedule: Schedule, timesteps: Tensor,
                      guidance_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """PLMS rows (Liu et al. 2022, eq. 12 with the DDIM transfer; SD's PLMSSampler).

    The DDIM (eta 0) update is linear in eps: x_prev = A x + B eps'. Row i combines
    eps' = w0 eps_t + prev (prev = the weighted older eps): c_x = A, c_eps = B w0, c_prev = B.
    Returns (rows [S + 1, 10], first [2]): row S is step 0's corrector, evaluated at the
    predicted x_prev (c_x = 0, c_eps = B/2, c_prev = 1, prev = A x + (B/2) eps_0), and first
    holds (A_0, B_0 / 2). Row 0 itself is the plain DDIM predictor.
    """
    abar = schedule.alphas_cumprod[timesteps]
    abar_prev = torch.cat([abar[1:], schedule.alphas_cumprod[:1]])
    a, s = abar.sqrt(), (1 - abar).sqrt()
    coef_a = abar_prev.sqrt() / a
    coef_b = (1 - abar_prev).sqrt() - abar_prev.sqrt() * s / a
    history = torch.tensor([PLMS_WEIGHTS[min(i, 3)][0] for i in range(len(timesteps))],
                           dtype=torch.float64)
    rows = step_coefficients(a=a, s=s, guidance_scale=guidance_scale, c_x=coef_a,
                             c_eps=coef_b * history, c_prev=coef_b)
    predictor = ddim_coefficients(schedule, timesteps, 0.0, guidance_scale)[:1]
    abar_next = schedule.alphas_cumprod[timesteps[min(1, len(timesteps) - 1)]]
    corrector = step_coefficients(a=abar_next.sqrt(), s=(1 - abar_next).sqrt(),
                                  guidance_scale=guidance_scale, c_eps=coef_b[0] / 2, c_prev=1.0)
    rows = torch.cat([predictor, rows[1:], corrector[None]])
    first = torch.stack([coef_a[0], coef_b[0] / 2]).to(torch.float32)
    return rows, first


# Adams-Bashforth weights of eps_t, eps_{t-1}, ... by history length (PNDM eq. 12; the
# 1-history entry is SD's 2nd-order (3 e_t - e_{t-1}) / 2; index 0 is the pseudo improved Euler).
PLMS_WEIGHTS = {
    0: (0.5,),
    1: (3 / 2, -1 / 2),
    2: (23 / 12, -16 / 12, 5 / 12),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
