"""Fake image sets for evaluation through the front door: one seed per image, batched prompts."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ldm.eval.errors import EvalError


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompts file; EvalError if missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise EvalError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def cycle_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """n prompts: the file's prompts in order, repeated as needed."""
    return [prompts[i % len(prompts)] for i in range(n)]


def generate(pipe, options, prompts: Sequence[str], seed: int = 0, batch: int = 16,
             progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """RGB uint8 images, image i from prompts[i] with seed + i (batches keep that rule)."""
    import ldm

    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        chunk = tuple(prompts[start:start + batch])
        # A prompt tuple gives image k the seed `seed + k`, so batching never changes an image.
        step = dataclasses.replace(options, prompt=chunk, num_images=len(chunk), seed=seed + start)
        images += [np.asarray(im.convert("RGB")) for im in ldm.txt2img(pipe, step)]
        if progress is not None:
            progress(len(chunk))
    if len(images) != len(prompts):
        raise EvalError(f"generation returned {len(images)} images for {len(prompts)} prompts")
    return images


def save_images(images: Sequence[np.ndarray], prompts: Sequence[str], folder: str | Path) -> None:
    """NNNNNN.png + NNNNNN.txt (its prompt) per image, as the data folders use."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(prompt + "\n")
