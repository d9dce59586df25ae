"""Sampling with a Pipeline: latents from contexts (`sample`) and images from prompts (`txt2img`).

`Pipeline.sample` and `Pipeline.txt2img` delegate here. Seeds are per image: image k of a batch
made with `seed` equals the single image made with `seed + k`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser, parse_prediction_type
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.noise import Generators, randn, seeded_generators
from ldm.diffusion.samplers import get_sampler, sample as run_sampler
from ldm.diffusion.timesteps import check_steps
from ldm.errors import LdmError

if TYPE_CHECKING:
    from ldm.cuda_graph import SamplingGraphs
    from ldm.pipeline import Pipeline

MAX_GUIDANCE_SCALE = 100.0  # beyond this guidance only produces saturated noise


class SamplingError(LdmError, ValueError):
    """Bad sampling arguments (steps, sampler, guidance, sizes, shapes)."""


def check_sampling_args(pipe: "Pipeline", steps: int, sampler: str, guidance_scale: float,
                        eta: float | None) -> None:
    """Validate user-facing sampling arguments, each failure one clear SamplingError line."""
    try:
        get_sampler(sampler)
        check_steps(steps, pipe.schedule.num_timesteps)
    except ValueError as err:
        raise SamplingError(str(err)) from None
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)
            and 0 <= guidance_scale <= MAX_GUIDANCE_SCALE):
        raise SamplingError(f"guidance scale must be a number in 0..{MAX_GUIDANCE_SCALE:g}, "
                            f"got {guidance_scale}")
    if eta is not None and not (math.isfinite(eta) and 0 <= eta <= 1):
        raise SamplingError(f"eta must be in 0..1, got {eta}")


def make_denoiser(pipe: "Pipeline", context: Tensor, uncond_context: Tensor | None,
                  guidance_scale: float, guidance_rescale: float = 0.0) -> Denoiser:
    """The pipeline's U-Net as a (guided) Denoiser for `context` [B, L, D]."""
    diffusion = pipe.config.diffusion
    context = context.to(pipe.device, pipe.dtype)
    if uncond_context is not None:
        uncond_context = uncond_context.to(pipe.device, pipe.dtype)
        if uncond_context.shape[0] == 1 and context.shape[0] > 1:
            uncond_context = uncond_context.expand_as(context)
    return classifier_free_guidance(
        pipe.unet, context, uncond_context, guidance_scale,
        prediction_type=parse_prediction_type(diffusion.prediction_type),
        learned_variance=diffusion.learned_variance, guidance_rescale=guidance_rescale)


def sample(pipe: "Pipeline", context: Tensor, uncond_context: Tensor | None, x_T: Tensor,
           steps: int = 50, sampler: str = "ddim", eta: float | None = 0.0,
           guidance_scale: float = 7.5, noise: Tensor | None = None,
           callback: Callable[[int, Tensor, Tensor], None] | None = None, *,
           generator: Generators = None, guidance_rescale: float = 0.0) -> Tensor:
    """Denoise x_T [B, C, h, w] into the final latent (still scaled by the latent scale factor).

    noise: optional [steps, *x_T.shape] per-step noise of stochastic samplers (else drawn from
    `generator`); eta: DDIM/Euler-ancestral stochasticity, None for the sampler's default (only
    0 is accepted by deterministic samplers); callback(i, x, denoised) after every step.
    """
    check_sampling_args(pipe, steps, sampler, guidance_scale, eta)
    if sampler != "ddim" and eta == 0.0:
        eta = None  # the API default; other samplers keep their own default
    if x_T.ndim != 4 or x_T.shape[1] != pipe.latent_channels:
        raise SamplingError(f"x_T must be [B, {pipe.latent_channels}, h, w], got {list(x_T.shape)}")
    if context.shape[0] != x_T.shape[0]:
        raise SamplingError(f"context batch {context.shape[0]} must equal x_T batch {x_T.shape[0]}")
    denoiser = make_denoiser(pipe, context, uncond_context, guidance_scale, guidance_rescale)
    with torch.inference_mode():
        try:
            return run_sampler(sampler, denoiser, x_T.to(pipe.device, pipe.dtype), pipe.schedule,
                               steps, eta=eta, noise=noise, generator=generator, callback=callback)
        except ValueError as err:  # argument problems found by the sampler (noise shape, ...)
            raise SamplingError(str(err)) from None


def default_image_size(pipe: "Pipeline") -> int:
    """Native image side: 64 latent pixels for SD-scale U-Nets (512 for SD), else the VAE's
    training resolution (the config stores no separate sampling size)."""
    if pipe.config.unet.model_channels >= 320:
        return 64 * pipe.downsampling_factor
    return pipe.config.autoencoder.resolution


def check_image_size(pipe: "Pipeline", height: int, width: int) -> None:
    """Height and width must be positive multiples of the autoencoder's factor."""
    factor = pipe.downsampling_factor
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
            raise SamplingError(f"{name} must be a positive multiple of {factor} (the latent "
                                f"factor of this model), got {value}")


# Latents larger than this on a side are decoded in tiles by default: one-shot decoding of a
# 1024x1024 SD image holds several GB of decoder activations, tiles of 64 hold a quarter of that.
AUTO_TILE_ABOVE = 96
DEFAULT_TILE = 64


def resolve_vae_tile(latent_hw: tuple[int, int], vae_tile: int | None) -> int:
    """Latent tile side for decoding: None = automatic (DEFAULT_TILE above AUTO_TILE_ABOVE), 0 = off."""
    if vae_tile is None:
        return DEFAULT_TILE if max(latent_hw) > AUTO_TILE_ABOVE else 0
    if isinstance(vae_tile, bool) or not isinstance(vae_tile, int) or vae_tile < 0 or 0 < vae_tile < 8:
        raise SamplingError(f"vae_tile must be 0 (one pass) or a latent tile side >= 8, got {vae_tile}")
    return vae_tile


def latents_to_images(pipe: "Pipeline", latents: Tensor, vae_tile: int | None = None) -> list[Image.Image]:
    """Decode scaled latents to 8-bit RGB images (decoder output [-1, 1] clamped).

    vae_tile: decode in overlapping latent tiles of this side (bounded memory, seamless
    blending; see ldm.models.tiling); 0 decodes in one pass; None picks automatically.
    """
    from ldm.models.tiling import decode_tiled
    from ldm.runtime import release_free_memory
    tile = resolve_vae_tile(tuple(latents.shape[-2:]), vae_tile)
    # With trimming off (ldm.runtime.tune_allocator) the U-Net's freed activations stay mapped
    # and the decoder's differently sized blocks pile on top: measured 4543 MiB peak for a
    # 512 px bf16 SD 2.1-base run, against 4066 MiB with glibc's defaults. Handing them back
    # first costs the decoder some page faults, once per batch.
    if latents.device.type == "cpu":
        release_free_memory()
    with torch.inference_mode():
        if tile:
            pixels = decode_tiled(pipe.decode_latents, latents, pipe.downsampling_factor,
                                  tile=tile, overlap=tile // 4)
        else:
            pixels = pipe.decode_latents(latents)
        pixels = pixels.float().clamp(-1, 1)
    array = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def txt2img(pipe: "Pipeline", prompt: str, negative_prompt: str = "", height: int | None = None,
            width: int | None = None, steps: int = 50, sampler: str = "ddim",
            guidance_scale: float = 7.5, eta: float | None = None, seed: int = 0,
            num_images: int = 1, callback: Callable[[int, Tensor, Tensor], None] | None = None,
            guidance_rescale: float = 0.0,
            graphs: "SamplingGraphs | None" = None,
            vae_tile: int | None = None) -> list[Image.Image]:
    """Images for `prompt`; image k uses seed + k for its start noise and per-step noise.

    graphs: a SamplingGraphs (CUDA) to run the sampling loop as one captured graph replay.
    vae_tile: see latents_to_images.
    """
    height = default_image_size(pipe) if height is None else height
    width = default_image_size(pipe) if width is None else width
    check_image_size(pipe, height, width)
    check_sampling_args(pipe, steps, sampler, guidance_scale, eta)
    if not isinstance(num_images, int) or num_images < 1:
        raise SamplingError(f"num_images must be >= 1, got {num_images}")
    factor = pipe.downsampling_factor
    resolve_vae_tile((height // factor, width // factor), vae_tile)  # bad values fail before sampling
    with torch.inference_mode():
        context = pipe.encode_prompt([prompt] * num_images)
        uncond = pipe.encode_prompt([negative_prompt] * num_images) if guidance_scale != 1 else None
    generators = seeded_generators(seed, num_images)  # CPU: same numbers on every device
    shape = (num_images, pipe.latent_channels, height // factor, width // factor)
    x_T = randn(shape, generators, pipe.device, pipe.dtype)
    if graphs is not None:  # the whole loop as one CUDA graph replay (no per-step callback)
        latents = graphs.sample(context, uncond, x_T, steps, sampler, eta, guidance_scale,
                                generators, guidance_rescale)
    else:
        latents = sample(pipe, context, uncond, x_T, steps=steps, sampler=sampler, eta=eta,
                         guidance_scale=guidance_scale, callback=callback, generator=generators,
                         guidance_rescale=guidance_rescale)
    return latents_to_images(pipe, latents, vae_tile)
