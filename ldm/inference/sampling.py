"""The one sampling core: prompts -> contexts -> start noise -> sampler -> latents -> images.

`sample` denoises given tensors (every random tensor can be passed explicitly, as the reference
fixtures need); txt2img (ldm.inference.txt2img) is the front door for prompts; the editing tasks
(img2img, inpaint, upscale) call the same `sample` with a later start, a latent hook or a
conditioned U-Net. Seeds
are per image: image k of a batch made with `seed` equals the single image made with `seed + k`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import UNetFn, classifier_free_guidance
from ldm.diffusion.noise import Generators, randn, seeded_generators
from ldm.diffusion.samplers import Hook, visited_timesteps
from ldm.diffusion.samplers import sample as run_sampler
from ldm.errors import SamplingError
from ldm.inference.options import SamplingOptions
from ldm.prediction import parse_prediction_type

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline

Callback = Callable[[int, Tensor, Tensor], None]  # (step, x after the step, denoised estimate)


def run_steps(pipe: "Pipeline", options: SamplingOptions) -> int:
    """Steps (and callbacks) of a whole run of options' sampler: SD's uniform DDIM spacing
    visits more than options.steps when they do not divide the training steps."""
    return len(visited_timesteps(options.sampler, pipe.schedule, options.steps,
                                 pipe.config.diffusion.timestep_spacing))


def edit_start(pipe: "Pipeline", options: SamplingOptions, strength: float) -> int:
    """Plan index an edit of `strength` begins at: it runs SD's t_enc = int(strength * steps)
    last steps of the plan (ddim.py DDIMSampler.decode)."""
    return run_steps(pipe, options) - int(strength * options.steps)


def task_steps(pipe: "Pipeline", options: SamplingOptions) -> int:
    """Callbacks a task with these options makes (a progress bar's total): the whole plan, or
    int(strength * steps) for an edit, plus int(hr_strength * steps) for a hires fix pass."""
    count = run_steps(pipe, options)
    if options.strength is not None:
        count = int(options.strength * options.steps)
    if options.hr_scale is not None:
        count += int(options.hr_strength * options.steps)
    return count


def make_denoiser(pipe: "Pipeline", context: Tensor, uncond_context: Tensor | None,
                  options: SamplingOptions, unet: UNetFn | None = None) -> Denoiser:
    """The pipeline's U-Net (or `unet`, a wrapper adding conditioning to it) as a (guided)
    Denoiser for `context` [B, L, D]."""
    diffusion = pipe.config.diffusion
    context = context.to(pipe.device, pipe.dtype)
    if uncond_context is not None:
        uncond_context = uncond_context.to(pipe.device, pipe.dtype)
        if uncond_context.shape[0] == 1 and context.shape[0] > 1:
            uncond_context = uncond_context.expand_as(context)
    denoiser = classifier_free_guidance(
        unet or pipe.unet, context, uncond_context, options.guidance_scale,
        prediction_type=parse_prediction_type(diffusion.prediction_type),
        learned_variance=diffusion.learned_variance, guidance_rescale=options.guidance_rescale)
    if options.classifier is not None and options.classifier_scale > 0:
        from ldm.models.classifier import guide_with_classifier
        denoiser = guide_with_classifier(denoiser, pipe.schedule, options.classifier,
                                         options.classifier_labels, options.classifier_scale,
                                         pipe.device, pipe.latent_channels)
    return denoiser


def sample(pipe: "Pipeline", context: Tensor, uncond_context: Tensor | None, x_T: Tensor,
           options: SamplingOptions, *, start: int | None = None, hook: Hook | None = None,
           unet: UNetFn | None = None, noise: Tensor | None = None,
           generator: Generators = None, callback: Callback | None = None) -> Tensor:
    """Denoise x_T [B, C, h, w] into the final latent (still scaled by the latent scale factor).

    Uses options' sampler, steps, eta and guidance. start: None for a whole run from the start
    noise x_T, or the plan index to begin at, x_T then being a latent already noised to that
    step's level (see ldm.diffusion.samplers.encode_level). hook(i, x) -> x: applied before
    step i and to the final latent. unet: the U-Net with extra conditioning (concat, labels).
    noise: optional [run steps, *x_T.shape] per-step noise of stochastic samplers (else drawn
    from `generator`); callback after every step.
    """
    channels = pipe.latent_channels
    if x_T.ndim != 4 or x_T.shape[1] != channels:
        raise SamplingError(f"x_T must be [B, {channels}, h, w], got {list(x_T.shape)}")
    if context.shape[0] != x_T.shape[0]:
        raise SamplingError(f"context batch {context.shape[0]} must equal x_T batch {x_T.shape[0]}")
    denoiser = make_denoiser(pipe, context, uncond_context, options, unet)
    with torch.inference_mode():
        try:
            return run_sampler(options.sampler, denoiser, x_T.to(pipe.device, pipe.dtype),
                               pipe.schedule, options.steps, eta=options.eta, start=start,
                               hook=hook, noise=noise, generator=generator, callback=callback,
                               spacing=pipe.config.diffusion.timestep_spacing)
        except ValueError as err:  # argument problems found by the sampler (noise shape, ...)
            raise SamplingError(str(err)) from None


def encode_prompts(pipe: "Pipeline", options: SamplingOptions) -> tuple[Tensor, Tensor | None]:
    """(context, uncond context or None without guidance), one row per image."""
    with torch.inference_mode():
        context = pipe.encode_prompt(list(options.prompts))
        uncond = None
        if options.guidance_scale != 1:
            uncond = pipe.encode_prompt([options.negative_prompt] * options.num_images)
    return context, uncond


def start_noise(pipe: "Pipeline", options: SamplingOptions) -> tuple[Tensor, list[torch.Generator]]:
    """(x_T, per-image generators) for resolved options; CPU generators give the same numbers
    on every device."""
    generators = seeded_generators(options.seed, options.num_images)
    factor = pipe.downsampling_factor
    shape = (options.num_images, pipe.latent_channels, options.height // factor,
             options.width // factor)
    return randn(shape, generators, pipe.device, pipe.dtype), generators
