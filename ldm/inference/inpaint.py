"""Inpainting and outpainting: txt2img (or img2img) with the known region held to the original.

Any text-to-image model: latent blending. Before every step the latent outside the mask is
replaced by the original latent noised to that step's level, and the final latent by the
original itself (SD's DDIMSampler with `mask` and `x0`: img_orig = q_sample(x0, ts),
img = img_orig * mask + (1 - mask) * img, with mask = 1 on the known region).
SD's inpainting model (conditioning 'inpaint'): no blending; the U-Net sees
cat([x_t, mask, masked-image latent]) as scripts/gradio/inpainting.py builds it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from ldm.diffusion.noise import Generators, randn, seeded_generators
from ldm.diffusion.samplers import Hook, step_levels
from ldm.errors import SamplingError
from ldm.inference.conditioning import concat_unet, require_conditioning
from ldm.inference.encode import encode_latent, resize_to, to_pixels
from ldm.inference.images import decode, to_pil
from ldm.inference.img2img import resolve_for_image, stochastic_encode
from ldm.inference.masks import (binarise, check_same_size, latent_mask, mask_tensor,
                                 nearest_latent_mask, pad_canvas)
from ldm.inference.options import SamplingOptions
from ldm.inference.sampling import Callback, edit_start, encode_prompts, sample

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline


def blend_hook(original: Tensor, keep: Tensor, levels: tuple[Tensor, Tensor],
               noise: Tensor) -> Hook:
    """Latent blending: before step i the latent becomes keep * (a_i original + s_i noise[i]) +
    (1 - keep) * latent; at the end (s = 0) keep * original + (1 - keep) * latent.

    keep [B, 1, h, w] in [0, 1] (1 = known); levels: (a, s) of the run's steps and its end;
    noise [steps, *original.shape].
    """
    a, s = (v.tolist() for v in levels)
    if noise.shape[0] < len(a) - 1 or noise.shape[1:] != original.shape:
        raise SamplingError(f"blend noise must be [{len(a) - 1}, {', '.join(map(str, original.shape))}], "
                            f"got {list(noise.shape)}")

    def hook(i: int, x: Tensor) -> Tensor:
        known = (original if s[i] == 0 else a[i] * original + s[i] * noise[i]).to(x.dtype)
        weight = keep.to(x.dtype)
        return weight * known + (1 - weight) * x  # exact where keep is 0 or 1
    return hook


def inpaint_conditioning(pipe: "Pipeline", pixels: Tensor, mask: Tensor, *,
                         noise: Tensor | None = None, generator: Generators = None,
                         tile: int = 0) -> Tensor:
    """c_concat [B, 1 + C, h, w] of SD's inpainting model: the binarised mask at the latent
    size (nearest) and the scaled posterior sample of masked_image = pixels * (mask < 0.5)."""
    mask = binarise(mask)
    masked = pixels * (mask < 0.5)  # the region to repaint becomes 0.0 (mid grey)
    latent = encode_latent(pipe, masked, tile=tile, noise=noise, generator=generator)
    small = nearest_latent_mask(mask.to(latent.device, latent.dtype), tuple(latent.shape[-2:]))
    return torch.cat([small, latent], dim=1)


def inpaint(pipe: "Pipeline", options: SamplingOptions, image: Image.Image, mask: Image.Image, *,
            x_T: Tensor | None = None, masked_image_noise: Tensor | None = None,
            posterior_noise: Tensor | None = None, encode_noise: Tensor | None = None,
            blend_noise: Tensor | None = None, noise: Tensor | None = None,
            callback: Callback | None = None) -> list[Image.Image]:
    """options.num_images versions of `image` with the white part of `mask` repainted.

    From noise (options.strength None) or from the original noised by options.strength. The
    mask may be grown (mask_dilate) and softened (mask_feather); keep_unmasked pastes the
    original pixels back outside it. Random tensors not given are drawn from the per-image
    seeds: masked_image_noise (inpainting model), x_T or posterior_noise + encode_noise (the
    original's latent and its forward noising), blend_noise [steps, ...], per-step noise.
    """
    kind = require_conditioning(pipe, "crossattn", "inpaint")
    check_same_size(image, mask)
    options = resolve_for_image(options, pipe, image)
    width, height, count = options.width, options.height, options.num_images
    pixels = to_pixels([resize_to(image, width, height)] * count)
    soft = mask_tensor(resize_to(mask.convert("L"), width, height, Image.Resampling.BILINEAR),
                       options.mask_dilate, options.mask_feather).expand(count, 1, height, width)
    generators = seeded_generators(options.seed, count)
    context, uncond = encode_prompts(pipe, options)
    unet, original, start = None, None, None
    if kind == "inpaint":
        concat = inpaint_conditioning(pipe, pixels, soft, noise=masked_image_noise,
                                      generator=generators, tile=options.vae_tile)
        unet = concat_unet(pipe.unet, concat)
    if kind == "crossattn" or options.strength is not None:
        original = encode_latent(pipe, pixels, tile=options.vae_tile, noise=posterior_noise,
                                 generator=generators)
    if options.strength is not None:
        start = edit_start(pipe, options, options.strength)
        x = stochastic_encode(pipe, original, options, start, noise=encode_noise,
                              generator=generators)
    else:
        factor = pipe.downsampling_factor
        shape = (count, pipe.latent_channels, height // factor, width // factor)
        x = x_T if x_T is not None else randn(shape, generators, pipe.device, pipe.dtype)
    hook = None
    if kind == "crossattn":
        levels = tuple(v[start or 0:] for v in step_levels(
            options.sampler, pipe.schedule, options.steps, pipe.config.diffusion.timestep_spacing))
        if blend_noise is None:
            blend_noise = torch.stack([randn(original.shape, generators, original.device,
                                             torch.float32) for _ in range(len(levels[0]) - 1)])
        keep = 1 - latent_mask(soft, pipe.downsampling_factor).to(original.device)
        hook = blend_hook(original, keep, levels, blend_noise.to(original.device))
    latents = sample(pipe, context, uncond, x, options, start=start, hook=hook, unet=unet,
                     noise=noise, generator=generators, callback=callback)
    result = decode(pipe, latents, options.vae_tile)
    if options.keep_unmasked:  # the original pixels outside the (soft) mask, exactly
        weight = soft.to(result.device)
        result = pixels.to(result.device) * (1 - weight) + result * weight
    return to_pil(result)


def outpaint(pipe: "Pipeline", options: SamplingOptions, image: Image.Image, *, left: int = 0,
             right: int = 0, top: int = 0, bottom: int = 0,
             callback: Callback | None = None) -> list[Image.Image]:
    """`image` on a canvas grown by the given pixels, the new border painted by inpainting."""
    if not any((left, right, top, bottom)):
        raise SamplingError("outpainting needs a positive padding on at least one side")
    canvas, mask = pad_canvas(image, left, right, top, bottom)
    return inpaint(pipe, replace(options, height=None, width=None), canvas, mask,
                   callback=callback)
