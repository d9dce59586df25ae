"""Everything that says how to sample, in one frozen object validated when it is built.

The CLI builds it from flags, Python callers build it directly, evaluation scripts vary it with
`dataclasses.replace`; nothing further down re-checks it. `resolve` binds it to one model once:
default image size, size multiples, step count within the schedule, automatic VAE tiling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ldm.diffusion.samplers import SAMPLERS, STOCHASTIC_SAMPLERS, check_spacing
from ldm.errors import SamplingError

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline

MAX_GUIDANCE_SCALE = 100.0  # beyond this guidance only produces saturated noise
# Latents larger than this on a side are decoded in tiles by default: one-shot decoding of a
# 1024x1024 SD image holds several GB of decoder activations, tiles of 64 hold a quarter of that.
AUTO_TILE_ABOVE = 96
DEFAULT_TILE = 64
MIN_TILE = 8
# One-pass VAE work is refused beyond this many latent pixels (256 x 256: a 2048 x 2048 SD
# image, whose one-pass decoder holds about 10 GB of fp32 activations); tiles bound it instead.
MAX_ONE_PASS_LATENT_PIXELS = 256 * 256
HR_UPSCALERS = ("latent", "pixels")
MAX_HR_SCALE = 4.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingOptions:
    """How to turn a prompt into images. Image k of a batch uses seed + k (start and step noise).

    prompt: one prompt for all num_images images, or a sequence with one prompt per image (the
    batch is then as long as the sequence).

    eta: DDIM / Euler-ancestral stochasticity, None for the sampler's default (0 for ddim, 1 for
    euler_a); deterministic samplers accept only None or 0. height/width: pixels, None for the
    model's native size. vae_tile: decode in overlapping latent tiles of this side, 0 in one
    pass, None automatically (tiles of DEFAULT_TILE above AUTO_TILE_ABOVE latent pixels).

    Editing: strength in (0, 1] is how much of the plan img2img / inpainting re-runs (SD's
    t_enc = int(strength * steps)), None for a whole run from noise; noise_level: the x4
    upscaler's augmentation level (None: the model's default); mask_dilate / mask_feather:
    grow / soften the inpainting mask by that many pixels; keep_unmasked: paste the original
    pixels outside the mask back after decoding. Hires fix (txt2img): hr_scale > 1 generates
    at the base size, upscales the latent (hr_upscale "latent") or the decoded image ("pixels")
    by it, and re-runs img2img at hr_strength at the larger size.
    """
    prompt: str | tuple[str, ...] = ""
    negative_prompt: str = ""
    steps: int = 50
    sampler: str = "ddim"
    eta: float | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    num_images: int = 1
    vae_tile: int | None = None
    strength: float | None = None
    noise_level: int | None = None
    mask_dilate: int = 0
    mask_feather: int = 0
    keep_unmasked: bool = False
    hr_scale: float | None = None
    hr_strength: float = 0.5
    hr_upscale: str = "latent"
    classifier: str | None = None
    classifier_labels: str = ""
    classifier_scale: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.prompt, (list, tuple)):
            prompts = tuple(self.prompt)
            if not prompts or self.num_images not in (1, len(prompts)):
                raise SamplingError(f"a prompt list gives one image per prompt: {len(prompts)} "
                                    f"prompt(s) with num_images {self.num_images!r}")
            object.__setattr__(self, "prompt", prompts)  # frozen: normalised once, here
            object.__setattr__(self, "num_images", len(prompts))
        texts = self.prompt if isinstance(self.prompt, tuple) else (self.prompt,)
        if not all(isinstance(text, str) for text in (*texts, self.negative_prompt)):
            raise SamplingError("prompt and negative_prompt must be strings")
        if self.sampler not in SAMPLERS:
            raise SamplingError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if not _is_int(self.steps) or self.steps < 1:
            raise SamplingError(f"steps must be a positive integer, got {self.steps!r}")
        if self.eta is not None:
            if not _is_number(self.eta) or not 0 <= self.eta <= 1:
                raise SamplingError(f"eta must be in 0..1, got {self.eta!r}")
            if self.eta != 0 and self.sampler not in STOCHASTIC_SAMPLERS:
                raise SamplingError(f"sampler {self.sampler!r} is deterministic and takes no eta "
                                    f"(got {self.eta}); use {' or '.join(STOCHASTIC_SAMPLERS)}")
        if not _is_number(self.guidance_scale) or not 0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE:
            raise SamplingError(f"guidance scale must be a number in 0..{MAX_GUIDANCE_SCALE:g}, "
                                f"got {self.guidance_scale!r}")
        if not _is_number(self.guidance_rescale) or not 0 <= self.guidance_rescale <= 1:
            raise SamplingError(f"guidance rescale must be in 0..1, got {self.guidance_rescale!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise SamplingError(f"{name} must be a positive number of pixels, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise SamplingError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.num_images) or self.num_images < 1:
            raise SamplingError(f"num_images must be >= 1, got {self.num_images!r}")
        tile = self.vae_tile
        if tile is not None and (not _is_int(tile) or tile < 0 or 0 < tile < MIN_TILE):
            raise SamplingError(f"vae_tile must be 0 (one pass) or a latent tile side >= {MIN_TILE}, "
                                f"got {tile!r}")
        self._check_editing()
        self._check_classifier()

    def _check_classifier(self) -> None:
        """Classifier guidance: a latent classifier file, the classes to steer toward
        ("color=red,shape=circle"; names checked against the file's labels when it is loaded)
        and the scale s of eps - s sqrt(1 - abar_t) grad log p(y | x_t)."""
        if self.classifier is not None and not isinstance(self.classifier, str):
            raise SamplingError(f"classifier must be a file path string, got {self.classifier!r}")
        if not _is_number(self.classifier_scale) or self.classifier_scale < 0:
            raise SamplingError(f"classifier scale must be a number >= 0, got {self.classifier_scale!r}")
        if self.classifier is None:
            if self.classifier_scale or self.classifier_labels:
                raise SamplingError("classifier labels and scale need a classifier (--classifier FILE)")
            return
        parts = [part.partition("=") for part in str(self.classifier_labels).split(",")]
        if not all(key.strip() and sep and value.strip() for key, sep, value in parts):
            raise SamplingError(f"classifier labels must be attribute=name pairs separated by "
                                f"commas (e.g. color=red,shape=circle), got {self.classifier_labels!r}")

    def _check_editing(self) -> None:
        """The editing fields (img2img, inpainting, upscaling, hires fix)."""
        for name in ("strength", "hr_strength"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 < value <= 1):
                raise SamplingError(f"{name} must be in (0, 1], got {value!r}")
        if self.strength is not None and int(self.strength * self.steps) < 1:
            # SD's img2img: t_enc = int(strength * steps) denoising steps; 0 would return noise.
            raise SamplingError(f"strength {self.strength} with {self.steps} steps runs no "
                                f"denoising step (int(strength * steps) = 0); raise either")
        if self.noise_level is not None and (not _is_int(self.noise_level) or self.noise_level < 0):
            raise SamplingError(f"noise level must be a non-negative integer, got {self.noise_level!r}")
        for name in ("mask_dilate", "mask_feather"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise SamplingError(f"{name} must be a non-negative number of pixels, "
                                    f"got {getattr(self, name)!r}")
        if not isinstance(self.keep_unmasked, bool):
            raise SamplingError(f"keep_unmasked must be True or False, got {self.keep_unmasked!r}")
        hr = self.hr_scale
        if hr is not None and (not _is_number(hr) or not 1 < hr <= MAX_HR_SCALE):
            raise SamplingError(f"hr_scale must be in (1, {MAX_HR_SCALE:g}], got {hr!r}")
        if self.hr_upscale not in HR_UPSCALERS:
            raise SamplingError(f"hr_upscale must be one of {', '.join(HR_UPSCALERS)}, "
                                f"got {self.hr_upscale!r}")
        if hr is not None and int(self.hr_strength * self.steps) < 1:
            raise SamplingError(f"hr_strength {self.hr_strength} with {self.steps} steps runs no "
                                f"denoising step (int(hr_strength * steps) = 0); raise either")

    @property
    def prompts(self) -> tuple[str, ...]:
        """One prompt per image."""
        if isinstance(self.prompt, tuple):
            return self.prompt
        return (self.prompt,) * self.num_images


def default_image_size(pipe: "Pipeline") -> int:
    """Native image side: 64 latent pixels for SD-scale U-Nets (512 for SD), else the VAE's
    training resolution (the config stores no separate sampling size)."""
    if pipe.config.unet.model_channels >= 320:
        return 64 * pipe.downsampling_factor
    return pipe.config.autoencoder.resolution


def resolve(options: SamplingOptions, pipe: "Pipeline") -> SamplingOptions:
    """`options` bound to one model: concrete height, width and vae_tile, checked against it."""
    factor = pipe.downsampling_factor
    height = options.height or default_image_size(pipe)
    width = options.width or default_image_size(pipe)
    for name, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            raise SamplingError(f"{name} must be a positive multiple of {factor} (the latent "
                                f"factor of this model), got {value}")
    if options.steps > pipe.schedule.num_timesteps:
        raise SamplingError(f"steps must be an integer in 1..{pipe.schedule.num_timesteps} "
                            f"(the training steps), got {options.steps}")
    diffusion = pipe.config.diffusion
    try:
        check_spacing(options.sampler, diffusion.timestep_spacing)
    except ValueError as err:
        raise SamplingError(f"this model samples on the {diffusion.timestep_spacing!r} timestep "
                            f"grid: {err}") from None
    guidance = options.guidance_scale
    if diffusion.distilled_guidance:
        # The network already returns the guided prediction: one conditional pass per step.
        # Its own scale (or 1, as PNGs of such runs record it) is the only one it can give.
        if guidance not in (1, diffusion.distilled_guidance):
            raise SamplingError(f"this model has classifier-free guidance "
                                f"{diffusion.distilled_guidance:g} distilled in; guidance scale "
                                f"must be {diffusion.distilled_guidance:g} (or 1), got {guidance:g}")
        guidance = 1.0
    tile = options.vae_tile
    if tile is None:
        tile = DEFAULT_TILE if max(height, width) // factor > AUTO_TILE_ABOVE else 0
    if tile == 0 and (height // factor) * (width // factor) > MAX_ONE_PASS_LATENT_PIXELS:
        raise SamplingError(f"image {width}x{height} is too large for one-pass VAE work "
                            f"(vae_tile 0): at most {MAX_ONE_PASS_LATENT_PIXELS} latent pixels; "
                            f"use tiles, e.g. vae_tile {DEFAULT_TILE}")
    return replace(options, height=height, width=width, vae_tile=tile, guidance_scale=guidance)
