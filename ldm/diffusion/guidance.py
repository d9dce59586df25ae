"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper with the denoiser's signature.

One batched forward of [uncond; cond]; the fused sampler step combines the halves as
uncond + guidance_scale * (cond - uncond) (its reference: ldm.prediction.combine_guidance).
Scale 1 is a single conditional pass. Guidance rescale (Lin et al. 2024, eq. 15-16, applied to
the raw output as diffusers does) needs per-sample statistics, so with it the wrapper combines
the halves itself, with the same function.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.prediction import PredictionType, combine_guidance

UNetFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, context) -> raw output


def classifier_free_guidance(unet: UNetFn, context: Tensor, uncond_context: Tensor | None,
                             guidance_scale: float, *,
                             prediction_type: PredictionType = PredictionType.EPS,
                             learned_variance: bool = False,
                             guidance_rescale: float = 0.0) -> Denoiser:
    """A Denoiser running `unet` with guidance toward `context` and away from `uncond_context`."""
    if guidance_scale < 0 or guidance_rescale < 0 or guidance_rescale > 1:
        raise ValueError(f"need guidance_scale >= 0 and 0 <= guidance_rescale <= 1, "
                         f"got {guidance_scale} and {guidance_rescale}")
    if guidance_scale == 1.0:
        return Denoiser(lambda x, t: unet(x, t, context), prediction_type, learned_variance)
    if uncond_context is None:
        raise ValueError("classifier-free guidance with a scale other than 1 needs uncond_context")
    if uncond_context.shape != context.shape:
        raise ValueError(f"uncond_context {list(uncond_context.shape)} must match context "
                         f"{list(context.shape)}")
    both = torch.cat([uncond_context, context])  # built once, reused every step

    def batched(x: Tensor, t: Tensor) -> Tensor:
        return unet(torch.cat([x, x]), torch.cat([t, t]), both)

    if guidance_rescale > 0:
        def rescaled(x: Tensor, t: Tensor) -> Tensor:
            return combine_guidance(batched(x, t), guidance_scale, guidance_rescale, learned_variance)
        return Denoiser(rescaled, prediction_type, learned_variance)
    return Denoiser(batched, prediction_type, learned_variance, guidance_scale=guidance_scale)
