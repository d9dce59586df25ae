"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper with the denoiser's signature.

One batched forward of [uncond; cond]; the fused sampler step combines the halves as
uncond + guidance_scale * (cond - uncond). Scale 1 is a single conditional pass. Guidance
rescale (Lin et al. 2024, eq. 15-16, applied to the raw output as diffusers does) needs
per-sample statistics, so with it the wrapper combines the halves itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser, split_learned_variance
from ldm.kernels.sampler_step import PredictionType

UNetFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, context) -> raw output


def combine_guidance(output: Tensor, guidance_scale: float, guidance_rescale: float = 0.0,
                     learned_variance: bool = False) -> Tensor:
    """uncond + scale (cond - uncond) of a [uncond; cond] output, optionally std-rescaled."""
    uncond, cond = output.chunk(2)
    uncond_pred, _ = split_learned_variance(uncond, learned_variance)
    cond_pred, cond_var = split_learned_variance(cond, learned_variance)
    guided = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
    if guidance_rescale > 0:
        dims = tuple(range(1, guided.ndim))
        rescaled = guided * (cond_pred.std(dims, keepdim=True) / guided.std(dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    if cond_var is not None:  # guidance acts on the mean; the variance comes from the cond pass
        guided = torch.cat([guided, cond_var], dim=1)
    return guided


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
