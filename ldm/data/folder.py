"""An image folder with captions: `name.png` + `name.txt`, or a Hugging Face `metadata.jsonl`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ldm.errors import LdmError
from ldm.data.transforms import crop_flip, resize_short_side, sample_generator, to_unit_range

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


class DataError(LdmError, ValueError):
    """Training data that cannot be used (missing folder, no images, missing captions)."""


def _read_metadata(path: Path) -> dict[str, str]:
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{number}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    return captions


def scan_folder(root: str | Path, require_captions: bool) -> list[tuple[Path, str]]:
    """(image path, caption) pairs under `root` (recursive), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in data folder {root}")
    metadata = root / "metadata.jsonl"
    table = _read_metadata(metadata) if metadata.is_file() else {}
    pairs, missing = [], []
    for image in images:
        key = image.relative_to(root).as_posix()
        if key in table:
            caption = table[key]
        elif image.with_suffix(".txt").is_file():
            caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        else:
            missing.append(key)
            caption = ""
        pairs.append((image, caption))
    if missing and require_captions:
        raise DataError(f"{len(missing)} of {len(images)} images in {root} have no caption "
                        f"(e.g. {missing[0]}); add same-named .txt files or a metadata.jsonl, "
                        "or set data.require_captions=false")
    return pairs


class ImageFolder(torch.utils.data.Dataset):
    """Images resized/cropped to `size`, in [-1, 1], with captions; items are (index, seed) pairs."""

    def __init__(self, root: str | Path, size: int, random_crop: bool = False, flip: bool = False,
                 require_captions: bool = True, in_memory: bool = True) -> None:
        self.size, self.random_crop, self.flip = size, random_crop, flip
        pairs = scan_folder(root, require_captions)
        self.skipped = 0
        self.cache: list[torch.Tensor] | None = None
        if in_memory:
            # Decode once: on a 2-core CPU, PNG decoding each step would starve training.
            kept, cache = [], []
            if len(pairs) > 2000:
                log.info("decoding %d images from %s into memory", len(pairs), root)
            for path, caption in pairs:
                image = self._read(path)
                if image is not None:
                    kept.append((path, caption))
                    cache.append(image)
            pairs, self.cache = kept, cache
            if not pairs:
                raise DataError(f"none of the images in {root} could be read")
        self.paths = [p for p, _ in pairs]
        self.captions = [c for _, c in pairs]
        if self.skipped:
            log.warning("skipped %d unreadable image(s) in %s", self.skipped, root)

    def _read(self, path: Path) -> torch.Tensor | None:
        try:
            with Image.open(path) as image:
                return resize_short_side(image, self.size)
        except _READ_ERRORS as err:
            self.skipped += 1
            log.warning("skipping unreadable image %s (%s)", path, err)
            return None

    def __len__(self) -> int:
        return len(self.paths)

    def load_uint8(self, index: int) -> tuple[torch.Tensor, int]:
        """The resized (not yet cropped) uint8 image and its index; unreadable files fall back to a neighbour."""
        if self.cache is not None:
            return self.cache[index], index
        for offset in range(len(self.paths)):
            image = self._read(self.paths[(index + offset) % len(self.paths)])
            if image is not None:
                return image, (index + offset) % len(self.paths)
        raise DataError("none of the images in the data folder could be read")

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, str]:
        index, seed = item
        generator = sample_generator(seed) if (self.random_crop or self.flip) else None
        image, index = self.load_uint8(index)
        image = crop_flip(image, self.size, self.random_crop, self.flip, generator)
        return to_unit_range(image), self.captions[index]
