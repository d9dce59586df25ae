"""Plain pixel analysis that reads (color, shape, background) back from a shapes image.

No learning: the background is the palette colour of the border (shapes keep a 2-pixel
margin), the shape colour is the palette colour of the other pixels, and the shape follows
from how much of its bounding box it fills (circle pi/4, square 1, triangle 1/2) and from
how its width changes from top to bottom (the triangle's apex is at the top).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm.data.shapes import COLORS, PALETTE, Triple

_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)  # [8, 3]


@dataclass(frozen=True)
class Classification:
    """What the classifier read from one image, with the measurements behind the shape call."""
    color: str
    shape: str
    background: str
    fill_ratio: float    # shape area / bounding-box area
    width_ratio: float   # mean width of the top quarter / mean width of the bottom quarter

    @property
    def triple(self) -> Triple:
        """(color, shape, background)."""
        return (self.color, self.shape, self.background)


def nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index into COLORS of the nearest palette colour for each RGB pixel: [...,3] -> [...]."""
    diff = pixels[..., None, :].astype(np.float32) - _PALETTE_RGB
    return np.argmin((diff * diff).sum(-1), axis=-1)


def _shape_from_alpha(alpha: np.ndarray) -> tuple[str, float, float]:
    """Shape name, fill ratio and width ratio from a soft foreground mask [H, W] in [0, 1]."""
    # A pixel belongs to the shape when it is nearer the shape colour than the background.
    # Thresholding first (rather than summing soft values) keeps the faint colour noise of
    # generated backgrounds from stretching the bounding box; rows/columns need 2 such pixels.
    mask = alpha > 0.5
    rows = np.nonzero(mask.sum(1) >= 2)[0]
    cols = np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) < 2 or len(cols) < 2:
        return "none", 0.0, 0.0
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = float(box.sum() / box.size)
    widths = box.sum(1).astype(np.float64)    # shape pixels per row, top to bottom
    quarter = max(1, len(widths) // 4)
    top, bottom = widths[:quarter].mean(), widths[-quarter:].mean()
    width_ratio = float(top / max(bottom, 1e-6))
    # Triangle: top quarter ~1/7 as wide as the bottom one; circle and square ~1.
    if width_ratio < 0.5 and fill < 0.7:
        shape = "triangle"
    elif fill >= 0.89:
        shape = "square"
    elif fill >= 0.62:
        shape = "circle"
    else:
        shape = "triangle" if width_ratio < 0.8 else "none"
    return shape, fill, width_ratio


def classify(image: np.ndarray) -> Classification:
    """Read (color, shape, background) from an RGB uint8 image [H, W, 3]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    pixels = image.astype(np.float32)
    labels = nearest_palette(pixels)                        # [H, W]
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg_index = int(np.bincount(border, minlength=len(COLORS)).argmax())
    bg = _PALETTE_RGB[bg_index]
    # The shape colour is the most common palette label among the non-background pixels.
    others = labels[labels != bg_index]
    if others.size == 0:
        return Classification("none", "none", COLORS[bg_index], 0.0, 0.0)
    fg_index = int(np.bincount(others, minlength=len(COLORS)).argmax())
    fg = _PALETTE_RGB[fg_index]
    # Soft coverage: where each pixel lies on the segment from background to shape colour.
    direction = fg - bg
    alpha = ((pixels - bg) @ direction) / float(direction @ direction)
    shape, fill, width_ratio = _shape_from_alpha(np.clip(alpha, 0.0, 1.0))
    return Classification(COLORS[fg_index], shape, COLORS[bg_index], fill, width_ratio)
