"""Image preprocessing shared by every data source: resize, crop, flip, scale to [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_short_side(image: Image.Image, size: int) -> torch.Tensor:
    """RGB uint8 tensor [3, H, W] whose shorter side is `size` (bicubic, antialiased by PIL)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def crop_flip(image: torch.Tensor, size: int, random_crop: bool, flip: bool,
              generator: torch.Generator | None) -> torch.Tensor:
    """Crop [3, H, W] to size x size (centre or random) and maybe mirror it."""
    _, h, w = image.shape
    if random_crop and generator is not None:
        top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    image = image[:, top:top + size, left:left + size]
    if flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
    return image


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 [.., 3, H, W] -> float32 in [-1, 1]."""
    return image.float().div_(127.5).sub_(1.0)


def sample_generator(seed: int) -> torch.Generator:
    """A CPU generator for one sample's augmentation, so results do not depend on workers."""
    return torch.Generator().manual_seed(seed)
