"""One fused sampler step: classifier-free guidance, parameterisation and update.

Every sampler step we support is, per element,

    out      = u + g * (c - u)            if model_output holds [uncond; cond] (2B rows)
             = model_output               if it holds B rows
    x        = a * x0 + s * eps           (how the current latent relates to x0 and eps)
    x0, eps  from out by the parameterisation (eps, v or x0; for v we normalise by
             r = sqrt(a^2 + s^2) so VE-style sigma schedules work too)
    x_next   = c_x * x + c_x0 * x0 + c_eps * eps + c_prev * prev + c_noise * std * noise

with std = 1, or, for learned variance (model_output has 2C channels, the second half
interpolating log-variances as improved DDPM eq. 15 does),
std = exp(0.5 * (f * logvar_max + (1 - f) * logvar_min)), f = (var_out + 1) / 2.

DDIM: a=sqrt(abar_t), s=sqrt(1-abar_t), c_x0=sqrt(abar_prev), c_eps=sqrt(1-abar_prev-sigma^2),
c_noise=sigma. DDPM posterior: c_x=coef2, c_x0=coef1, c_noise=posterior std. Euler in sigma
space: a=1, s=sigma, c_x=1, c_eps=sigma_next-sigma. DPM-Solver++(2M): c_x=sigma_next/sigma,
c_x0 and c_prev (previous denoised) from its multistep formula. PLMS: prev = combined history.

Coefficients travel as a float32 tensor on x's device (one row per step, precomputed), so
a sampling loop has no host scalars and can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ldm._extension import fused_device_types, has_extension
from ldm.prediction import (PredictionType, combine_guidance, learned_log_variance,
                            split_learned_variance, to_x0_eps)

# Device types with a compiled kernel: a fact of the build, fixed once ldm._C is loaded
# (a constant, so torch.compile folds the dispatch choice).
_FUSED_DEVICES = fused_device_types("sampler_step")


# Indices into the coefficient vector.
COEFF_GUIDANCE, COEFF_A, COEFF_S, COEFF_X, COEFF_X0, COEFF_EPS, COEFF_NOISE, COEFF_PREV, \
    COEFF_LOGVAR_MIN, COEFF_LOGVAR_MAX = range(10)
NUM_COEFFS = 10


def step_coefficients(*, a: Tensor | float, s: Tensor | float, guidance_scale: Tensor | float = 1.0,
                      c_x: Tensor | float = 0.0, c_x0: Tensor | float = 0.0,
                      c_eps: Tensor | float = 0.0, c_noise: Tensor | float = 0.0,
                      c_prev: Tensor | float = 0.0, logvar_min: Tensor | float = 0.0,
                      logvar_max: Tensor | float = 0.0) -> Tensor:
    """Stack per-step coefficients (scalars or [steps] tensors) into [..., NUM_COEFFS] float32."""
    values = [guidance_scale, a, s, c_x, c_x0, c_eps, c_noise, c_prev, logvar_min, logvar_max]
    tensors = [torch.as_tensor(v, dtype=torch.float64) for v in values]
    tensors = torch.broadcast_tensors(*tensors)
    return torch.stack(tensors, dim=-1).to(torch.float32)


def sampler_step_reference(x: Tensor, model_output: Tensor, coeffs: Tensor,
                           noise: Tensor | None = None, prev: Tensor | None = None,
                           prediction_type: int = PredictionType.EPS,
                           learned_variance: bool = False) -> tuple[Tensor, Tensor]:
    """Eager PyTorch version of the fused step; returns (x_next, denoised x0)."""
    c = coeffs.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    out = model_output.float()
    batch = x.shape[0]
    if out.shape[0] == 2 * batch:
        out = combine_guidance(out, c[COEFF_GUIDANCE], learned_variance=learned_variance)
    elif out.shape[0] != batch:
        raise ValueError(f"model_output batch {out.shape[0]} must be {batch} or {2 * batch}")
    out, var_out = split_learned_variance(out, learned_variance)
    x0, eps = to_x0_eps(xf, out, c[COEFF_A], c[COEFF_S], PredictionType(prediction_type))
    x_next = c[COEFF_X] * xf + c[COEFF_X0] * x0 + c[COEFF_EPS] * eps
    if prev is not None:
        x_next = x_next + c[COEFF_PREV] * prev.float()
    if noise is not None:
        std = c[COEFF_NOISE]
        if var_out is not None:
            logvar = learned_log_variance(var_out, c[COEFF_LOGVAR_MIN], c[COEFF_LOGVAR_MAX])
            std = std * torch.exp(0.5 * logvar)
        x_next = x_next + std * noise.float()
    return x_next.to(x.dtype), x0.to(x.dtype)


def sampler_step(x: Tensor, model_output: Tensor, coeffs: Tensor, noise: Tensor | None = None,
                 prev: Tensor | None = None, prediction_type: int = PredictionType.EPS,
                 learned_variance: bool = False) -> tuple[Tensor, Tensor]:
    """Fused guided sampler step (see module docstring); returns (x_next, denoised x0)."""
    if x.device.type in _FUSED_DEVICES:
        if coeffs.device != x.device or coeffs.dtype != torch.float32:
            coeffs = coeffs.to(device=x.device, dtype=torch.float32)
        return torch.ops.ldm.sampler_step(x, model_output, coeffs, noise, prev,
                                          int(prediction_type), learned_variance)
    return sampler_step_reference(x, model_output, coeffs, noise, prev, int(prediction_type),
                                  learned_variance)


def _fake_sampler_step(x: Tensor, model_output: Tensor, coeffs: Tensor, noise: Tensor | None,
                       prev: Tensor | None, prediction_type: int,
                       learned_variance: bool) -> tuple[Tensor, Tensor]:
    """Shapes of (x_next, x0): contiguous tensors like x."""
    batch, channels = x.shape[0], x.shape[1]
    torch._check(model_output.shape[0] in (batch, 2 * batch) and model_output.shape[1] ==
                 (2 * channels if learned_variance else channels),
                 lambda: f"ldm::sampler_step: model_output shape {tuple(model_output.shape)} "
                 f"does not match x {tuple(x.shape)}")
    torch._check(coeffs.shape == (NUM_COEFFS,), lambda: "ldm::sampler_step: coeffs must be "
                 f"[{NUM_COEFFS}], got {tuple(coeffs.shape)}")
    return x.new_empty(x.shape), x.new_empty(x.shape)


if has_extension():
    torch.library.register_fake("ldm::sampler_step")(_fake_sampler_step)
