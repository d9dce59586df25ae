"""Latents to pictures: decoding (whole or in tiles) and conversion to 8-bit RGB images."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from ldm.models.tiling import decode_tiled
from ldm.runtime import release_free_memory

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline


def decode(pipe: "Pipeline", latents: Tensor, vae_tile: int = 0) -> Tensor:
    """Scaled latents -> decoder output in [-1, 1] (float32), in latent tiles of `vae_tile`
    (overlapping and blended, see ldm.models.tiling) or in one pass when it is 0."""
    # With trimming off (ldm.runtime.tune_allocator) the U-Net's freed activations stay mapped
    # and the decoder's differently sized blocks pile on top: measured 4543 MiB peak for a
    # 512 px bf16 SD 2.1-base run, against 4066 MiB with glibc's defaults. Handing them back
    # first costs the decoder some page faults, once per batch.
    if latents.device.type == "cpu":
        release_free_memory()
    with torch.inference_mode():
        if vae_tile:
            pixels = decode_tiled(pipe.decode_latents, latents, pipe.downsampling_factor,
                                  tile=vae_tile, overlap=vae_tile // 4)
        else:
            pixels = pipe.decode_latents(latents)
        return pixels.float().clamp(-1, 1)


def to_pil(pixels: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] values in [-1, 1] -> 8-bit RGB images."""
    array = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def latents_to_images(pipe: "Pipeline", latents: Tensor, vae_tile: int = 0) -> list[Image.Image]:
    """Decode scaled latents to 8-bit RGB images."""
    return to_pil(decode(pipe, latents, vae_tile))
