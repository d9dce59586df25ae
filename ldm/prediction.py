"""What a network predicts (eps, v or x0), how to read it, and how guidance combines outputs.

The bottom of the package: the fused kernels' references and the diffusion maths both import
these, so every conversion is written once.

With x_t = a x0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t) for VP schedules):
  eps-prediction:  x0 = (x_t - s eps) / a
  x0-prediction:   eps = (x_t - a x0) / s
  v-prediction:    v = alpha eps - sigma x0 with alpha = a / r, sigma = s / r, r = sqrt(a^2 + s^2)
                   (Salimans & Ho 2022, sec. 4), so with x = x_t / r: x0 = alpha x - sigma v and
                   eps = sigma x + alpha v. r = 1 for VP schedules; dividing by it lets sigma
                   samplers (a = 1, s = sigma) read v-models too.
Learned variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15): the network outputs 2C
channels; the second half v in [-1, 1] interpolates log sigma^2 between log beta_t and the
log posterior variance.
Classifier-free guidance (Ho & Salimans 2022): uncond + g (cond - uncond) on the prediction;
guidance rescale (Lin et al. 2024, eq. 15-16) pulls the guided output's std back toward cond's.
"""
from __future__ import annotations

import enum

import torch
from torch import Tensor


class PredictionType(enum.IntEnum):
    """What the network outputs; the integer values are the fused kernels' encoding."""
    EPS = 0
    V = 1
    X0 = 2


PREDICTION_TYPES = {"eps": PredictionType.EPS, "v": PredictionType.V, "x0": PredictionType.X0}

Scalar = Tensor | float


def parse_prediction_type(name: str | int) -> PredictionType:
    """PredictionType from a config string ("eps", "v", "x0") or an enum value."""
    if isinstance(name, PredictionType):
        return name
    if isinstance(name, int):
        return PredictionType(name)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {name!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[name]


def split_learned_variance(output: Tensor, learned_variance: bool) -> tuple[Tensor, Tensor | None]:
    """Split a [B,2C,...] learned-variance output into (prediction, variance values)."""
    if not learned_variance:
        return output, None
    prediction, var_values = output.chunk(2, dim=1)
    return prediction, var_values


def to_x0_eps(x: Tensor, output: Tensor, a: Scalar, s: Scalar,
              prediction_type: PredictionType) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a network output at x_t = a x0 + s eps."""
    if prediction_type == PredictionType.EPS:
        return (x - s * output) / a, output
    if prediction_type == PredictionType.X0:
        return output, (x - a * output) / s
    if prediction_type == PredictionType.V:
        r = torch.sqrt(torch.as_tensor(a * a + s * s))
        alpha, sigma, xn = a / r, s / r, x / r
        return alpha * xn - sigma * output, sigma * xn + alpha * output
    raise ValueError(f"unknown prediction_type {prediction_type}")


def from_x0_eps(x0: Tensor, eps: Tensor, a: Scalar, s: Scalar,
                prediction_type: PredictionType) -> Tensor:
    """The target a network of `prediction_type` should output for x_t = a x0 + s eps (VP)."""
    if prediction_type == PredictionType.EPS:
        return eps
    if prediction_type == PredictionType.X0:
        return x0
    if prediction_type == PredictionType.V:
        return a * eps - s * x0
    raise ValueError(f"unknown prediction_type {prediction_type}")


def eps_from_x0(x: Tensor, x0: Tensor, a: Scalar, s: Scalar) -> Tensor:
    """The noise implied by a denoised estimate: eps = (x_t - a x0) / s."""
    return (x - a * x0) / s


def learned_log_variance(var_values: Tensor, logvar_min: Scalar, logvar_max: Scalar) -> Tensor:
    """log sigma^2 = f log_max + (1 - f) log_min with f = (v + 1) / 2 (improved DDPM eq. 15)."""
    frac = (var_values + 1) / 2
    return frac * logvar_max + (1 - frac) * logvar_min


def combine_guidance(output: Tensor, guidance_scale: Scalar, guidance_rescale: float = 0.0,
                     learned_variance: bool = False) -> Tensor:
    """uncond + scale (cond - uncond) of a [uncond; cond] output, optionally std-rescaled.

    With learned variance, guidance acts on the mean and the variance comes from the cond half.
    """
    uncond, cond = output.chunk(2)
    uncond_pred, _ = split_learned_variance(uncond, learned_variance)
    cond_pred, cond_var = split_learned_variance(cond, learned_variance)
    guided = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
    if guidance_rescale > 0:
        dims = tuple(range(1, guided.ndim))
        rescaled = guided * (cond_pred.std(dims, keepdim=True) / guided.std(dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    if cond_var is not None:
        guided = torch.cat([guided, cond_var], dim=1)
    return guided
