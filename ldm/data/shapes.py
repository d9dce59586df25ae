"""The synthetic "shapes" dataset: one filled shape of one palette colour on a solid background.

Every image is a pure function of (seed, index), so the dataset, its folder export and the
evaluator agree without storing anything. Shapes are rendered as coverage masks at 4x and
box-averaged down, which gives smooth (anti-aliased) edges without any drawing library.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

Triple = tuple[str, str, str]  # (color, shape, background)

# The default model never sees these during training; the evaluator checks it composes them.
HELD_OUT_TRIPLES: tuple[Triple, ...] = (
    ("red", "triangle", "blue"),
    ("green", "circle", "purple"),
    ("blue", "square", "yellow"),
    ("yellow", "triangle", "black"),
    ("purple", "square", "white"),
    ("orange", "circle", "green"),
    ("white", "triangle", "red"),
    ("black", "circle", "orange"),
)

# The first template is the canonical caption (used by the evaluator and the README).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} on a {background} background",
    "{color} {shape}, {background} background",
    "a {color} {shape} against a {background} background",
    "a picture of a {color} {shape} on {background}",
    "a {background} background with a {color} {shape}",
)

SUPERSAMPLE = 4       # render at 4x, then box-average down
MIN_SIDE, MAX_SIDE = 0.4, 0.7  # bounding-box side as a fraction of the image size
MARGIN = 2.0          # minimum distance (pixels) between the shape's box and the border


@dataclass(frozen=True)
class ShapeSpec:
    """One image: what is drawn and where (box in pixels of the final image)."""
    color: str
    shape: str
    background: str
    x0: float          # left edge of the bounding box
    y0: float          # top edge of the bounding box
    side: float        # bounding box side (the triangle is as wide as it is tall)

    @property
    def triple(self) -> Triple:
        """(color, shape, background)."""
        return (self.color, self.shape, self.background)


def all_triples() -> list[Triple]:
    """Every (color, shape, background) with background != color: 8 x 3 x 7 = 168."""
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def validate_triples(triples: Iterable[Sequence[str]]) -> list[Triple]:
    """Check names against the palette and shape list; raise ValueError naming the bad one."""
    out = []
    for item in triples:
        if len(item) != 3:
            raise ValueError(f"triple {tuple(item)!r} must be (color, shape, background)")
        color, shape, background = item
        if color not in PALETTE or background not in PALETTE:
            raise ValueError(f"triple {tuple(item)!r}: colours must be one of {', '.join(COLORS)}")
        if shape not in SHAPES:
            raise ValueError(f"triple {tuple(item)!r}: shape must be one of {', '.join(SHAPES)}")
        out.append((color, shape, background))
    return out


def allowed_triples(exclude: Iterable[Sequence[str]] = ()) -> list[Triple]:
    """All triples minus `exclude` (in a fixed order, so sampling is reproducible)."""
    excluded = set(validate_triples(exclude))
    return [t for t in all_triples() if t not in excluded]


def caption(spec_or_triple: ShapeSpec | Triple, template: int = 0) -> str:
    """Caption of a spec (or triple) with the given template index."""
    color, shape, background = (spec_or_triple.triple if isinstance(spec_or_triple, ShapeSpec)
                                else spec_or_triple)
    return CAPTION_TEMPLATES[template].format(color=color, shape=shape, background=background)


def sample_spec(rng: random.Random, size: int, triples: Sequence[Triple]) -> ShapeSpec:
    """Draw a triple uniformly from `triples` and a box uniformly within the constraints."""
    color, shape, background = triples[rng.randrange(len(triples))]
    side = rng.uniform(MIN_SIDE, MAX_SIDE) * size
    x0 = rng.uniform(MARGIN, size - MARGIN - side)
    y0 = rng.uniform(MARGIN, size - MARGIN - side)
    return ShapeSpec(color, shape, background, x0, y0, side)


def coverage(spec: ShapeSpec, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 [size, size] in [0, 1]."""
    n = size * supersample
    centres = (np.arange(n, dtype=np.float64) + 0.5) / supersample  # sub-pixel centres, in pixels
    y, x = centres[:, None], centres[None, :]
    s = spec.side
    if spec.shape == "circle":
        cx, cy, r = spec.x0 + s / 2, spec.y0 + s / 2, s / 2
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif spec.shape == "square":
        inside = (x >= spec.x0) & (x <= spec.x0 + s) & (y >= spec.y0) & (y <= spec.y0 + s)
    elif spec.shape == "triangle":
        # Apex at (x0 + s/2, y0), base from (x0, y0 + s) to (x0 + s, y0 + s): the half-width
        # at depth d below the apex is d / 2, so the base is as wide as the triangle is tall.
        depth = y - spec.y0
        inside = (depth >= 0) & (depth <= s) & (np.abs(x - (spec.x0 + s / 2)) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; allowed: {', '.join(SHAPES)}")
    inside = np.broadcast_to(inside, (n, n)).astype(np.float32)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(spec: ShapeSpec, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """RGB uint8 [size, size, 3]: the background blended with the shape colour by coverage."""
    alpha = coverage(spec, size, supersample)[..., None]
    fg = np.asarray(PALETTE[spec.color], dtype=np.float32)
    bg = np.asarray(PALETTE[spec.background], dtype=np.float32)
    return np.rint(alpha * fg + (1.0 - alpha) * bg).astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """Item i is rendered from (seed, i): {"image": [3, H, W] in [-1, 1], "caption": str, ...}."""

    def __init__(self, length: int, seed: int = 0, size: int = 64,
                 exclude: Iterable[Sequence[str]] = (), paraphrase: bool = True) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        self.length, self.seed, self.size, self.paraphrase = length, seed, size, paraphrase
        self.triples = allowed_triples(exclude)
        if not self.triples:
            raise ValueError("every triple is excluded; nothing to draw")

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> tuple[ShapeSpec, int]:
        """The spec and caption template of item `index` (a pure function of seed and index)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = random.Random(f"shapes:{self.seed}:{index}")  # string seeds hash deterministically
        spec = sample_spec(rng, self.size, self.triples)
        # Half the captions are canonical: that is the form users (and the evaluator) prompt with.
        template = 0
        if self.paraphrase and rng.random() >= 0.5:
            template = rng.randrange(1, len(CAPTION_TEMPLATES))
        return spec, template

    def __getitem__(self, index: int) -> dict:
        spec, template = self.spec(index)
        pixels = torch.from_numpy(render(spec, self.size)).permute(2, 0, 1).float()
        return {"image": pixels / 127.5 - 1.0, "caption": caption(spec, template),
                "triple": spec.triple}


def crop_box(dataset: ShapesDataset, index: int, crop: int) -> tuple[int, int]:
    """(top, left) of item `index`'s random crop: a pure function of (seed, index, crop)."""
    if not 0 < crop <= dataset.size:
        raise ValueError(f"crop must be in [1, {dataset.size}], got {crop}")
    rng = random.Random(f"shapes-crop:{dataset.seed}:{index}:{crop}")
    return rng.randint(0, dataset.size - crop), rng.randint(0, dataset.size - crop)


def write_folder(root: str | Path, dataset: ShapesDataset, progress: bool = True,
                 crop: int | None = None) -> int:
    """Write NNNNNN.png + NNNNNN.txt (caption) per item into `root`; returns the count.

    `crop` writes a random crop x crop window of each image instead: a cheaper training set for
    the (fully convolutional) autoencoder, which only has to learn local colour and edges.
    """
    from tqdm import tqdm

    if crop is not None:
        crop_box(dataset, 0, crop)  # validate before writing anything
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(len(dataset) - 1)))
    for index in tqdm(range(len(dataset)), desc="shapes", disable=not progress):
        spec, template = dataset.spec(index)
        stem = root / f"{index:0{width}d}"
        # Write to temporary names then rename, so an interrupted run leaves no half files.
        tmp_png, tmp_txt = stem.with_suffix(".png.tmp"), stem.with_suffix(".txt.tmp")
        pixels = render(spec, dataset.size)
        if crop is not None:
            top, left = crop_box(dataset, index, crop)
            pixels = pixels[top:top + crop, left:left + crop]
        Image.fromarray(pixels).save(tmp_png, format="PNG")
        tmp_txt.write_text(caption(spec, template) + "\n")
        tmp_png.replace(stem.with_suffix(".png"))
        tmp_txt.replace(stem.with_suffix(".txt"))
    return len(dataset)
