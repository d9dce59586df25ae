"""x4 upscaling with SD's latent upscaler (conditioning 'upscale'): txt2img at the low-res size
whose U-Net also sees the noise-augmented low-res image and its noise level.

Conventions of scripts/gradio/superresolution.py (predict / paint): the low-res image in pixel
space (x / 127.5 - 1, neither encoded nor scaled), noised by the model's own augmentation
schedule to `noise_level` (ImageConcatWithNoiseAugmentation), concatenated to the latent,
the level fed as the class label; the unconditional branch keeps both. The latent has the
low-res image's size, so the decoded image is f times larger (f = 4 for SD's x4 upscaler).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from ldm.diffusion.noise import randn, seeded_generators
from ldm.diffusion.noise_augmentation import noise_low_res
from ldm.errors import SamplingError
from ldm.inference.conditioning import concat_unet, require_conditioning
from ldm.inference.encode import resize_to, to_pixels
from ldm.inference.images import latents_to_images
from ldm.inference.options import SamplingOptions, resolve
from ldm.inference.sampling import Callback, encode_prompts, sample

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline

DEFAULT_NOISE_LEVEL = 20  # the superresolution demo's default


def noise_level_range(pipe: "Pipeline") -> tuple[int, int]:
    """(lowest, highest) noise level the upscaler takes: 0..max_noise_level, the range its
    training drew levels from (SD's demo offers the same)."""
    require_conditioning(pipe, "upscale")
    return 0, pipe.noise_augmentation.max_noise_level


def resolve_upscale(options: SamplingOptions, pipe: "Pipeline",
                    low_res: Image.Image) -> SamplingOptions:
    """options bound to the upscaler: output size (f x the low-res size unless given) and a
    noise level within the model's range."""
    low, high = noise_level_range(pipe)
    level = DEFAULT_NOISE_LEVEL if options.noise_level is None else options.noise_level
    if not low <= level <= high:
        raise SamplingError(f"noise level must be in {low}..{high} for this upscaler, got {level}")
    factor = pipe.downsampling_factor
    return resolve(replace(options, noise_level=level,
                           height=options.height or low_res.height * factor,
                           width=options.width or low_res.width * factor), pipe)


def augment(pipe: "Pipeline", low_res: Tensor, level: int, noise: Tensor) -> Tensor:
    """The low-res pixels [B, 3, h, w] noised to `level` by the model's augmentation schedule."""
    try:
        return noise_low_res(pipe.noise_augmentation, low_res, level, noise)
    except ValueError as err:
        raise SamplingError(str(err)) from None


def upscale(pipe: "Pipeline", options: SamplingOptions, low_res: Image.Image, *,
            x_T: Tensor | None = None, aug_noise: Tensor | None = None,
            noise: Tensor | None = None, callback: Callback | None = None) -> list[Image.Image]:
    """options.num_images upscales of `low_res` guided by options.prompt at options.noise_level.

    The low-res image is resized to options' size / f when height or width is given. Random
    tensors not given are drawn from the per-image seeds: aug_noise [B, 3, h, w], x_T, noise.
    """
    options = resolve_upscale(options, pipe, low_res)
    factor, count = pipe.downsampling_factor, options.num_images
    h, w = options.height // factor, options.width // factor
    pixels = to_pixels([resize_to(low_res, w, h)] * count)
    generators = seeded_generators(options.seed, count)
    if aug_noise is None:
        aug_noise = randn(pixels.shape, generators, "cpu", torch.float32)
    x_aug = augment(pipe, pixels, options.noise_level, aug_noise)
    labels = torch.full((count,), options.noise_level, dtype=torch.long)
    if x_T is None:
        x_T = randn((count, pipe.latent_channels, h, w), generators, pipe.device, pipe.dtype)
    context, uncond = encode_prompts(pipe, options)
    latents = sample(pipe, context, uncond, x_T, options,
                     unet=concat_unet(pipe.unet, x_aug.to(pipe.device, pipe.dtype), labels),
                     noise=noise, generator=generators, callback=callback)
    return latents_to_images(pipe, latents, options.vae_tile)
