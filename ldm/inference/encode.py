"""Pictures to latents: loading, resizing to the model's size step, VAE encoding (whole or tiled).

Conventions of SD's scripts/img2img.py (load_img): sides truncated to a multiple of the size
step and resized with Lanczos, pixels mapped by 2 * (x / 255) - 1, the VAE posterior SAMPLED
(mean + std * noise, not its mode) and multiplied by the latent scale factor
(LatentDiffusion.get_first_stage_encoding).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.diffusion.noise import Generators, randn
from ldm.errors import SamplingError
from ldm.models.tiling import tile_starts

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline


def fit_size(width: int, height: int, step: int) -> tuple[int, int]:
    """(width, height) truncated to multiples of `step` (SD's load_img: x - x % 64)."""
    if width < step or height < step:
        raise SamplingError(f"image {width}x{height} is smaller than the model's size step "
                            f"{step} px")
    return width - width % step, height - height % step


def resize_to(image: Image.Image, width: int, height: int,
              resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """`image` at width x height (unchanged when it already is)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=resample)


def to_pixels(images: list[Image.Image]) -> Tensor:
    """8-bit RGB images of one size -> [B, 3, H, W] float32 in [-1, 1] (2 * (x / 255) - 1)."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return 2.0 * torch.from_numpy(array).permute(0, 3, 1, 2) - 1.0


def encode_moments(pipe: "Pipeline", pixels: Tensor, tile: int = 0) -> tuple[Tensor, Tensor]:
    """Posterior (mean, logvar) [B, C, H/f, W/f] of pixels in [-1, 1]; in overlapping latent
    tiles of side `tile` (blended linearly, as decoding is) when tile > 0."""
    factor = pipe.downsampling_factor
    h, w = pixels.shape[-2] // factor, pixels.shape[-1] // factor
    with torch.inference_mode():
        if not tile or (h <= tile and w <= tile):
            mean, logvar = pipe.encode_image(pixels)
            return mean.float(), logvar.float()
        overlap = tile // 4
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        total = torch.zeros(h, w)
        out: Tensor | None = None
        for y in ys:
            for x in xs:
                part = pixels[..., y * factor:(y + tile) * factor, x * factor:(x + tile) * factor]
                moments = torch.cat(pipe.encode_image(part), dim=1).float().cpu()
                if out is None:
                    out = moments.new_zeros(*moments.shape[:2], h, w)
                weight = _tile_weight(moments.shape[-2:], overlap, y, x, ys, xs)
                out[..., y:y + tile, x:x + tile] += moments * weight
                total[y:y + tile, x:x + tile] += weight
        assert out is not None
        mean, logvar = (out / total).chunk(2, dim=1)
        return mean.to(pipe.device), logvar.to(pipe.device)


def _tile_weight(shape: torch.Size, overlap: int, y: int, x: int, ys: list[int],
                 xs: list[int]) -> Tensor:
    """Blend weight of one tile: linear ramps over the overlap on sides shared with a neighbour."""
    def ramp(length: int, rise: bool, fall: bool) -> Tensor:
        w = torch.ones(length)
        edge = (torch.arange(overlap) + 0.5) / max(overlap, 1)
        if overlap and rise:
            w[:overlap] = edge
        if overlap and fall:
            w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
        return w
    wy = ramp(shape[0], y != ys[0], y != ys[-1])
    wx = ramp(shape[1], x != xs[0], x != xs[-1])
    return wy[:, None] * wx[None, :]


def encode_latent(pipe: "Pipeline", pixels: Tensor, *, tile: int = 0,
                  noise: Tensor | None = None, generator: Generators = None) -> Tensor:
    """Scaled latent of pixels [B, 3, H, W] in [-1, 1]: scale_factor * (mean + std * noise),
    noise [B, C, H/f, W/f] given or drawn from `generator` (LDM's get_first_stage_encoding)."""
    mean, logvar = encode_moments(pipe, pixels, tile)
    if noise is None:
        noise = randn(mean.shape, generator, mean.device, torch.float32)
    elif noise.shape != mean.shape:
        raise SamplingError(f"posterior noise must be {list(mean.shape)}, got {list(noise.shape)}")
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # already clamped by the posterior; kept explicit
    latent = pipe.config.diffusion.scale_factor * (mean + std * noise.to(mean.device, mean.dtype))
    return latent.to(pipe.dtype)
