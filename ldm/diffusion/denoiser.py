"""The network as samplers see it: raw output for (x_t, t) plus how to read that output."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ldm.prediction import PredictionType

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x [B,C,H,W], t [B]) -> raw output


@dataclass(frozen=True)
class Denoiser:
    """A network with its parameterisation (see ldm.prediction for the conversions).

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
