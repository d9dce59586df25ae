"""txt2img, with the optional hires fix: generate, upscale, then img2img at the larger size.

The hires fix lets a model draw a composition at the size it was trained for and then adds
detail at a larger one (where a direct run repeats objects): the base latent is upscaled in
latent space (bilinear) or in pixel space (decode, Lanczos, encode), noised to hr_strength
and denoised again at the larger size with the same prompts and per-image generators; the
larger image's VAE work is tiled like any large image (options.vae_tile).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.diffusion.noise import Generators
from ldm.inference.conditioning import require_conditioning
from ldm.inference.encode import encode_latent, to_pixels
from ldm.inference.images import decode, latents_to_images, to_pil
from ldm.inference.img2img import img2img_latents
from ldm.inference.options import SamplingOptions, resolve
from ldm.inference.sampling import Callback, encode_prompts, run_steps, sample, start_noise

if TYPE_CHECKING:
    from ldm.inference.cuda_graph import SamplingGraphs
    from ldm.pipeline import Pipeline


def hires_options(options: SamplingOptions, pipe: "Pipeline") -> SamplingOptions:
    """The second pass's options: size hr_scale times the base (rounded to the latent factor),
    strength hr_strength, VAE tiling resolved again for that size."""
    base = resolve(options, pipe)
    factor = pipe.downsampling_factor
    height, width = (max(1, round(side * options.hr_scale / factor)) * factor
                     for side in (base.height, base.width))
    return resolve(replace(options, height=height, width=width, strength=options.hr_strength,
                           hr_scale=None), pipe)


def upscale_latents(pipe: "Pipeline", latents: Tensor, base: SamplingOptions,
                    large: SamplingOptions, generator: Generators) -> Tensor:
    """Base latents at the large size: bilinear in latent space, or decoded, resized (Lanczos)
    and encoded again (a posterior sample drawn from `generator`)."""
    factor = pipe.downsampling_factor
    if base.hr_upscale == "latent":
        size = (large.height // factor, large.width // factor)
        return F.interpolate(latents.float(), size=size, mode="bilinear",
                             align_corners=False).to(latents.dtype)
    images = [im.resize((large.width, large.height), Image.Resampling.LANCZOS)
              for im in to_pil(decode(pipe, latents, base.vae_tile))]
    return encode_latent(pipe, to_pixels(images), tile=large.vae_tile, generator=generator)


def txt2img(pipe: "Pipeline", options: SamplingOptions, *, callback: Callback | None = None,
            graphs: "SamplingGraphs | None" = None) -> list[Image.Image]:
    """options.num_images images for options.prompt (with a hires fix pass when hr_scale is set).

    graphs: a SamplingGraphs (CUDA) to run the base sampling loop as one captured graph replay
    (no per-step callback then).
    """
    require_conditioning(pipe, "crossattn")
    base = resolve(options, pipe)
    context, uncond = encode_prompts(pipe, base)
    x_T, generators = start_noise(pipe, base)
    if graphs is not None:
        latents = graphs.sample(context, uncond, x_T, base, generators)
    else:
        latents = sample(pipe, context, uncond, x_T, base, generator=generators,
                         callback=callback)
    if options.hr_scale is None:
        return latents_to_images(pipe, latents, base.vae_tile)
    large = hires_options(options, pipe)
    with torch.inference_mode():
        latents = upscale_latents(pipe, latents, base, large, generators)
    offset = run_steps(pipe, base)  # the second pass's callbacks continue the numbering
    shifted = None if callback is None else (lambda i, x, d: callback(offset + i, x, d))
    latents = img2img_latents(pipe, context, uncond, latents, large, large.strength,
                              generator=generators, callback=shifted)
    return latents_to_images(pipe, latents, large.vae_tile)
