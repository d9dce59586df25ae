"""img2img (SDEdit, Meng et al. 2022): txt2img started part-way down the plan from a noised image.

Conventions of SD's scripts/img2img.py: the image's scaled posterior sample is noised by
DDIMSampler.stochastic_encode to ddim_alphas[t_enc], t_enc = int(strength * steps), and
DDIMSampler.decode runs the last t_enc steps of the plan. Every sampler works: the samplers take
the plan index to begin at (`start`) and `encode_level` says how far to noise for it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from ldm.diffusion.guidance import UNetFn
from ldm.diffusion.noise import Generators, randn, seeded_generators
from ldm.diffusion.samplers import Hook, encode_level
from ldm.errors import SamplingError
from ldm.inference.conditioning import require_conditioning
from ldm.inference.encode import encode_latent, fit_size, resize_to, to_pixels
from ldm.inference.images import latents_to_images
from ldm.inference.options import SamplingOptions, resolve
from ldm.inference.sampling import Callback, edit_start, encode_prompts, sample

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline

Images = Image.Image | Sequence[Image.Image]


def stochastic_encode(pipe: "Pipeline", latent: Tensor, options: SamplingOptions, start: int, *,
                      noise: Tensor | None = None, generator: Generators = None) -> Tensor:
    """a * latent + s * noise at the level a run from plan index `start` begins with
    (DDIMSampler.stochastic_encode for DDIM; noise [B, C, h, w] given or drawn)."""
    a, s = encode_level(options.sampler, pipe.schedule, options.steps, start,
                        pipe.config.diffusion.timestep_spacing)
    if noise is None:
        noise = randn(latent.shape, generator, latent.device, torch.float32)
    elif noise.shape != latent.shape:
        raise SamplingError(f"encode noise must be {list(latent.shape)}, got {list(noise.shape)}")
    noise = noise.to(latent.device, torch.float32)
    return (a * latent.float() + s * noise).to(latent.dtype)


def img2img_latents(pipe: "Pipeline", context: Tensor, uncond_context: Tensor | None,
                    init_latent: Tensor, options: SamplingOptions, strength: float, *,
                    encode_noise: Tensor | None = None, noise: Tensor | None = None,
                    generator: Generators = None, hook: Hook | None = None,
                    unet: UNetFn | None = None, callback: Callback | None = None) -> Tensor:
    """The final latent of an edit of the scaled latent init_latent [B, C, h, w] at `strength`.

    encode_noise: the forward-noising noise; noise: the per-step noise [int(strength * steps),
    B, C, h, w] of stochastic samplers; both drawn from `generator` when not given (in that
    order). hook and unet as for ldm.inference.sample.
    """
    start = edit_start(pipe, options, strength)
    x = stochastic_encode(pipe, init_latent, options, start, noise=encode_noise,
                          generator=generator)
    return sample(pipe, context, uncond_context, x, options, start=start, hook=hook, unet=unet,
                  noise=noise, generator=generator, callback=callback)


def as_batch(images: Images, count: int) -> list[Image.Image]:
    """One image repeated `count` times (SD's img2img repeats it), or one image per batch row."""
    if isinstance(images, Image.Image):
        return [images] * count
    images = list(images)
    if len(images) != count:
        raise SamplingError(f"got {len(images)} images for a batch of {count}")
    return images


def resolve_for_image(options: SamplingOptions, pipe: "Pipeline",
                      image: Image.Image) -> SamplingOptions:
    """options with the image's size (truncated to the size step) unless height/width are set."""
    width, height = fit_size(*image.size, pipe.downsampling_factor)
    return resolve(replace(options, height=options.height or height,
                           width=options.width or width), pipe)


def img2img(pipe: "Pipeline", options: SamplingOptions, init_image: Images, *,
            init_latent: Tensor | None = None, posterior_noise: Tensor | None = None,
            encode_noise: Tensor | None = None, noise: Tensor | None = None,
            callback: Callback | None = None) -> list[Image.Image]:
    """options.num_images edits of init_image (one image for all, or one per image) toward
    options.prompt at options.strength.

    The image is resized to options' height x width, or its own size truncated to a multiple
    of the latent factor. Random tensors not given are drawn from the per-image seeds, in the
    order posterior noise, encode noise, per-step noise; init_latent replaces the encoding.
    """
    require_conditioning(pipe, "crossattn")
    if options.strength is None:
        raise SamplingError("img2img needs a strength in (0, 1] in its options")
    first = init_image if isinstance(init_image, Image.Image) else list(init_image)[0]
    options = resolve_for_image(options, pipe, first)
    generators = seeded_generators(options.seed, options.num_images)
    if init_latent is None:
        images = [resize_to(im, options.width, options.height)
                  for im in as_batch(init_image, options.num_images)]
        init_latent = encode_latent(pipe, to_pixels(images), tile=options.vae_tile,
                                    noise=posterior_noise, generator=generators)
    context, uncond = encode_prompts(pipe, options)
    latents = img2img_latents(pipe, context, uncond, init_latent.to(pipe.device, pipe.dtype),
                              options, options.strength, encode_noise=encode_noise, noise=noise,
                              generator=generators, callback=callback)
    return latents_to_images(pipe, latents, options.vae_tile)
