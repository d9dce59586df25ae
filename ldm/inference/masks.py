"""Inpainting masks (white = repaint): loading, dilation, feathering, the latent grid, outpainting.

Two conventions meet here. SD's inpainting model (scripts/gradio/inpainting.py make_batch_sd)
binarises the mask at 0.5, zeroes the masked pixels and resizes the mask to the latent grid
with F.interpolate's default 'nearest'. Latent blending (any model) needs to know which latent
pixels may keep the original: one whose f x f block holds any pixel to repaint is repainted
(max pooling), so no original content leaks into the masked region.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.errors import SamplingError


def mask_tensor(mask: Image.Image, dilate: int = 0, feather: int = 0) -> Tensor:
    """A mask image -> [1, 1, H, W] float32 in [0, 1] (grey levels kept), grown by `dilate`
    pixels (a square max filter), then softened by a Gaussian blur of sigma `feather` pixels."""
    values = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    out = torch.from_numpy(values.copy())[None, None]
    if dilate:
        out = F.max_pool2d(out, 2 * dilate + 1, stride=1, padding=dilate)
    if feather:
        out = _gaussian_blur(out, float(feather))
    return out


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [1, 1, H, W] with edge replication (radius 3 sigma)."""
    radius = max(1, int(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, -1, 1)).clamp(0, 1)


def binarise(mask: Tensor) -> Tensor:
    """1 where mask >= 0.5, else 0 (make_batch_sd: mask[mask < 0.5] = 0; mask[mask >= 0.5] = 1)."""
    return (mask >= 0.5).to(mask.dtype)


def check_same_size(image: Image.Image, mask: Image.Image) -> None:
    """The mask must cover the image pixel for pixel."""
    if image.size != mask.size:
        raise SamplingError(f"mask size {mask.size[0]}x{mask.size[1]} differs from the image "
                            f"size {image.size[0]}x{image.size[1]}")


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """[B, 1, H, W] pixel mask -> [B, 1, H/f, W/f]: a latent pixel is repainted (as strongly)
    as the most repainted pixel of its f x f block."""
    return F.max_pool2d(mask, factor) if factor > 1 else mask


def nearest_latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """SD's inpainting conditioning mask: F.interpolate(mask, size) ('nearest': pixel [f i, f j])."""
    return F.interpolate(mask, size=size)


def pad_canvas(image: Image.Image, left: int = 0, right: int = 0, top: int = 0,
               bottom: int = 0) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) for outpainting: the image grown by the given pixels, the new border
    filled by repeating the edge pixels (a neutral start for img2img-style runs), and a mask
    that is white exactly on the border."""
    pads = (left, right, top, bottom)
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pads):
        raise SamplingError(f"padding must be non-negative integers of pixels, got {pads}")
    array = np.asarray(image.convert("RGB"))
    canvas = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + array.shape[0], left:left + array.shape[1]] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, mode="L")
