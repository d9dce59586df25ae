"""Tiled VAE decoding: bounded memory for large images, seams hidden by overlapping tiles.

Each latent tile is decoded alone; overlapping pixels are blended with weights that ramp
linearly across the overlap (a partition of unity after normalising), so no tile edge shows.
The result differs slightly from one-shot decoding because the decoder's GroupNorm statistics
are computed per tile; with overlap of a quarter tile the difference stays small.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering 0..size with at least `overlap` shared; the last tile ends at size."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, rise: bool, fall: bool, device: torch.device) -> Tensor:
    """1-D blend weights: linear in (0, 1] over `overlap` at a rising/falling edge, else 1."""
    w = torch.ones(length, device=device)
    if overlap > 0:
        edge = (torch.arange(overlap, device=device) + 0.5) / overlap
        if rise:
            w[:overlap] = torch.minimum(w[:overlap], edge)
        if fall:
            w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w


def decode_tiled(decode: Callable[[Tensor], Tensor], z: Tensor, factor: int, tile: int = 64,
                 overlap: int = 16) -> Tensor:
    """decode(z) for z [B, C, h, w] computed in latent tiles of `tile` with `overlap` latent
    pixels shared by neighbours; `factor` is image size / latent size."""
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return decode(z)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out: Tensor | None = None
    total = torch.zeros(h * factor, w * factor, device=z.device)
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            part = decode(z[..., y:y + tile, x:x + tile]).float()  # [B, C', th*f, tw*f]
            if out is None:
                out = part.new_zeros(*part.shape[:2], h * factor, w * factor)
            th, tw = part.shape[-2:]
            wy = _ramp(th, overlap * factor, iy > 0, iy < len(ys) - 1, z.device)
            wx = _ramp(tw, overlap * factor, ix > 0, ix < len(xs) - 1, z.device)
            weight = wy[:, None] * wx[None, :]
            out[..., y * factor:y * factor + th, x * factor:x * factor + tw] += part * weight
            total[y * factor:y * factor + th, x * factor:x * factor + tw] += weight
    assert out is not None
    return (out / total).to(z.dtype)
