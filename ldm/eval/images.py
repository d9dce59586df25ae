"""Image folders for evaluation: read every image as RGB uint8, grouped by size."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.eval.errors import EvalError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | Path, what: str) -> list[Path]:
    """Sorted image files directly in `folder`; EvalError if it is missing or has none."""
    folder = Path(folder)
    if not folder.exists():
        raise EvalError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise EvalError(f"{what} path is not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise EvalError(f"{what} folder {folder} has no images ({', '.join(EXTENSIONS)})")
    return files


def read_images(files: list[Path]) -> list[np.ndarray]:
    """RGB uint8 arrays [H, W, 3]; EvalError naming the first unreadable file."""
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                out.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise EvalError(f"cannot read image {path}: {err}") from None
    return out


def read_captions(files: list[Path]) -> list[str] | None:
    """The caption beside each image (same stem, .txt), or None if any is missing."""
    captions = []
    for path in files:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            return None
        captions.append(txt.read_text().strip())
    return captions


def group_by_size(images: list[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images of each (height, width)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        groups[im.shape[:2]].append(i)
    return dict(groups)
