"""What the scripts read and write: input pictures, numbered PNGs with their generation
parameters (JSON in the text chunk "parameters"), grids."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"


class UsageError(Exception):
    """Bad input to a script: reported as one line, exit status 2."""


def load_image(path: str | Path, flag: str, mode: str = "RGB") -> Image.Image:
    """The picture at `path` in `mode`, fully read; a UsageError naming `flag` if it is missing
    or not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise UsageError(f"{flag} {path}: cannot read it as an image "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def read_png_parameters(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> dict:
    """The generation parameters stored in a PNG made by one of the scripts, with the
    `required` keys of the given types."""
    try:
        with Image.open(path) as image:
            text = image.text.get(PARAMETERS_KEY) if hasattr(image, "text") else None
    except (OSError, ValueError) as err:
        raise UsageError(f"--from-png {path}: cannot read it as a PNG ({err})") from None
    if text is None:
        raise UsageError(f"--from-png {path}: has no '{PARAMETERS_KEY}' text chunk "
                         "(not made by these scripts)")
    try:
        params = json.loads(text)
        valid = all(isinstance(params[key], kind) for key, kind in required.items())
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid or not 0 <= params["index"] < params["batch_size"]:
        raise UsageError(f"--from-png {path}: its '{PARAMETERS_KEY}' chunk is not valid")
    return params


def png_info(params: dict) -> PngInfo:
    """A PNG text chunk holding params as JSON."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(params))
    return info


def write_new_png(folder: Path, name_format: str, image: Image.Image, info: PngInfo,
                  number: int | None = None) -> Path:
    """Write image under the next free number in folder (from `number`, when it was assigned
    in advance), atomically and never overwriting."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    if number is None:
        number = 1 + max((int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()), default=-1)
    tmp = folder / f".tmp-{os.getpid()}.png"
    tmp.write_bytes(buffer.getvalue())
    try:
        while True:
            path = folder / name_format.format(number)
            try:
                os.link(tmp, path)  # fails if the name exists: never overwrites
                return path
            except FileExistsError:
                number += 1
    finally:
        tmp.unlink()


def make_grid(images: list[Image.Image], n_rows: int) -> Image.Image:
    """Images side by side, n_rows per row (SD's --n_rows is images per row)."""
    cols = n_rows or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, image in enumerate(images):
        grid.paste(image, ((k % cols) * w, (k // cols) * h))
    return grid
