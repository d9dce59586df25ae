"""Extra U-Net conditioning as a wrapper of the U-Net function the guidance wrapper calls.

SD's hybrid models (LatentInpaintDiffusion, LatentUpscaleDiffusion) feed the U-Net
cat([x_t, c_concat], dim=1) and, for the upscaler, the noise level as the class label y
(ldm/models/diffusion/ddpm.py DiffusionWrapper.forward, 'hybrid' / 'hybrid-adm'). Their scripts
give the unconditional branch the same c_concat and label, so the wrapper repeats them over the
guidance batch [uncond; cond].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldm.diffusion.guidance import UNetFn
from ldm.errors import SamplingError

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline

TASKS = {"crossattn": "txt2img / img2img (scripts/txt2img.py, scripts/img2img.py)",
         "inpaint": "inpainting (scripts/inpaint.py)",
         "upscale": "upscaling (scripts/upscale.py)"}
MODEL_NAMES = {"crossattn": "a text-to-image", "inpaint": "an inpainting", "upscale": "an x4 upscaler"}


def require_conditioning(pipe: "Pipeline", *allowed: str) -> str:
    """The pipeline's conditioning kind; a SamplingError naming the right task if not allowed."""
    kind = pipe.config.conditioning
    if kind not in allowed:
        raise SamplingError(f"this is {MODEL_NAMES[kind]} model (conditioning {kind!r}): use it "
                            f"for {TASKS[kind]}")
    return kind


def concat_unet(unet: UNetFn, concat: Tensor, labels: Tensor | None = None) -> UNetFn:
    """`unet` with concat [B, C', h, w] appended to its input channels and class labels
    y [B] (or None), both repeated over a guidance batch of k * B rows."""
    def conditioned(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        repeats = x.shape[0] // concat.shape[0]
        extra = concat if repeats == 1 else concat.repeat(repeats, 1, 1, 1)
        inputs = torch.cat([x, extra.to(x.device, x.dtype)], dim=1)
        if labels is None:
            return unet(inputs, t, context)
        return unet(inputs, t, context, y=labels.to(x.device).repeat(repeats))
    return conditioned
