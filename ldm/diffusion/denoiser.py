"""What a network predicts (eps, v or x0) and how to read it: the one place for the conversions.

With x_t = a x0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t)):
  eps-prediction:  x0 = (x_t - s eps) / a
  x0-prediction:   eps = (x_t - a x0) / s
  v-prediction:    v = a eps - s x0 (Salimans & Ho 2022, sec. 4), so x0 = a x_t - s v and
                   eps = s x_t + a v (using a^2 + s^2 = 1).
Learned variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15): the network outputs 2C
channels; the second half v in [-1, 1] interpolates log sigma^2 between log beta_t and the
log posterior variance.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.kernels.sampler_step import PredictionType

PREDICTION_TYPES = {"eps": PredictionType.EPS, "v": PredictionType.V, "x0": PredictionType.X0}

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x [B,C,H,W], t [B]) -> raw output


def parse_prediction_type(name: str | int) -> PredictionType:
    """PredictionType from a config string ("eps", "v", "x0") or an enum value."""
    if isinstance(name, PredictionType):
        return name
    if isinstance(name, int):
        return PredictionType(name)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {name!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[name]


@dataclass(frozen=True)
class Denoiser:
    """A network as samplers see it: raw output for (x_t, t) plus how to read that output.

    `model(x, t)` returns B rows, or 2B rows [uncond; cond] that the sampler step combines as
    uncond + guidance_scale * (cond - uncond) (see ldm.diffusion.guidance).
    """
    model: ModelFn
    prediction_type: PredictionType = PredictionType.EPS
    learned_variance: bool = False
    guidance_scale: float = 1.0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Raw network output for latents x [B,C,H,W] at timesteps t [B]."""
        return self.model(x, t)


def split_learned_variance(output: Tensor, learned_variance: bool) -> tuple[Tensor, Tensor | None]:
    """Split a [B,2C,...] learned-variance output into (prediction, variance values)."""
    if not learned_variance:
        return output, None
    prediction, var_values = output.chunk(2, dim=1)
    return prediction, var_values


def to_x0_eps(x: Tensor, output: Tensor, a: Tensor | float, s: Tensor | float,
              prediction_type: PredictionType) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a network output at x_t = a x0 + s eps (a^2 + s^2 = 1)."""
    if prediction_type == PredictionType.EPS:
        return (x - s * output) / a, output
    if prediction_type == PredictionType.X0:
        return output, (x - a * output) / s
    if prediction_type == PredictionType.V:
        return a * x - s * output, s * x + a * output
    raise ValueError(f"unknown prediction_type {prediction_type}")


def from_x0_eps(x0: Tensor, eps: Tensor, a: Tensor | float, s: Tensor | float,
                prediction_type: PredictionType) -> Tensor:
    """The target a network of `prediction_type` should output for x_t = a x0 + s eps."""
    if prediction_type == PredictionType.EPS:
        return eps
    if prediction_type == PredictionType.X0:
        return x0
    if prediction_type == PredictionType.V:
        return a * eps - s * x0
    raise ValueError(f"unknown prediction_type {prediction_type}")


def eps_from_x0(x: Tensor, x0: Tensor, a: Tensor | float, s: Tensor | float) -> Tensor:
    """The noise implied by a denoised estimate: eps = (x_t - a x0) / s."""
    return (x - a * x0) / s


def learned_log_variance(var_values: Tensor, logvar_min: Tensor | float,
                         logvar_max: Tensor | float) -> Tensor:
    """log sigma^2 = f log_max + (1 - f) log_min with f = (v + 1) / 2 (improved DDPM eq. 15)."""
    frac = (var_values + 1) / 2
    return frac * logvar_max + (1 - frac) * logvar_min


def extract(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] as float32 on t's device, shaped [B, 1, ..., 1] to broadcast over ndim dims."""
    picked = values.to(t.device)[t.long()].to(torch.float32)
    return picked.reshape(-1, *([1] * (ndim - 1)))
