"""Tiny data and configs shared by the training tests (CPU, seconds)."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (240, 210, 40)}

TINY_VAE = [
    "autoencoder.ch=32", "autoencoder.ch_mult=[1,2]", "autoencoder.num_res_blocks=1",
    "autoencoder.resolution=16", "data.size=16", "run.batch_size=4", "run.log_every=1",
    "run.image_every=0", "run.progress=false", "run.threads=1",
]
TINY_LDM = [
    "model.unet.model_channels=32", "model.unet.channel_mult=[1]", "model.unet.attention_resolutions=[1]",
    "model.unet.context_dim=32", "model.text_encoder.max_length=8",
    "model.text_encoder.arch_config={embed_dim: 32, text_cfg: {context_length: 8, vocab_size: 49408, "
    "width: 32, heads: 2, layers: 1}}",
    "data.size=16", "run.batch_size=4", "run.log_every=1", "run.image_every=0", "run.progress=false",
    "run.threads=1",
]


def make_folder(root: Path, count: int = 8, size: tuple[int, int] = (20, 18), captions: bool = True,
                seed: int = 0) -> Path:
    """Coloured discs on coloured backgrounds, with same-named .txt captions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        fg, bg = rng.sample(list(COLORS), 2)
        image = Image.new("RGB", size, COLORS[bg])
        x = rng.randint(0, size[0] - 10)
        ImageDraw.Draw(image).ellipse([x, 3, x + 9, 12], fill=COLORS[fg])
        image.save(root / f"{i:03d}.png")
        if captions:
            (root / f"{i:03d}.txt").write_text(f"a {fg} circle on a {bg} background")
    return root
