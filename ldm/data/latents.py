"""Latent caching for stage 2: encode every image once with the frozen VAE, train on the moments.

The cache keeps the posterior moments (mean and log-variance), not one sample, so each step
still draws a fresh latent z ~ q(z|x) as uncached training does; with flips on, mirrored
images are encoded too (a VAE is not flip-equivariant). The moments are also written to a
safetensors file keyed by a fingerprint of the VAE file and the images, so a rerun or a
resumed run does not encode again.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.data.transforms import crop_flip, sample_generator, to_unit_range

log = logging.getLogger(__name__)


class LatentCache(torch.utils.data.Dataset):
    """Posterior moments [2C, h, w] with captions; items are (index, seed) like ImageFolder's."""

    def __init__(self, moments: Tensor, captions: list[str], flipped: Tensor | None = None) -> None:
        self.moments, self.captions, self.flipped = moments, captions, flipped

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, str]:
        index, seed = item
        if self.flipped is not None and bool(torch.rand((), generator=sample_generator(seed)) < 0.5):
            return self.flipped[index], self.captions[index]
        return self.moments[index], self.captions[index]


@torch.inference_mode()
def encode_dataset(dataset, autoencoder: nn.Module, device: torch.device, flip: bool,
                   batch_size: int = 64, bf16: bool = False, progress: bool = False) -> LatentCache:
    """Encode a map-style image data set (centre crops) into a LatentCache on the CPU."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    starts = range(0, len(dataset), batch_size)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(starts) * (2 if flip else 1), desc="caching latents", unit="batch")

    def encode(mirror: bool) -> Tensor:
        chunks = []
        for start in starts:
            images = []
            for index in range(start, min(start + batch_size, len(dataset))):
                image, _ = dataset.load_uint8(index)
                image = crop_flip(image, dataset.size, False, False, None)
                images.append(image.flip(-1) if mirror else image)
            with autocast:
                posterior = autoencoder.encode(to_unit_range(torch.stack(images)).to(device))
            chunks.append(torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu())
            if bar is not None:
                bar.update(1)
        return torch.cat(chunks)

    cache = LatentCache(encode(False), list(dataset.captions), encode(True) if flip else None)
    if bar is not None:
        bar.close()
    return cache


def fingerprint(vae_path: str | Path, dataset, flip: bool, bf16: bool) -> str:
    """Identifies what a cache was made from: the VAE file's bytes and each image's path, size, mtime."""
    digest = hashlib.sha256()
    with open(vae_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{dataset.size}|{flip}|{bf16}".encode())
    for path in dataset.paths:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def load_or_encode(path: Path, key: str, dataset, autoencoder: nn.Module, device: torch.device,
                   flip: bool, bf16: bool, write: bool, progress: bool) -> LatentCache:
    """The cache at `path` if its fingerprint is `key`, else encode (and write it when `write`)."""
    if path.is_file():
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as handle:
                stored = (handle.metadata() or {}).get("fingerprint")
            if stored == key:
                tensors = load_file(str(path))
                log.info("using cached latents %s", path)
                return LatentCache(tensors["moments"], list(dataset.captions), tensors.get("flipped"))
        except Exception as err:  # an unreadable cache is only a cache: encode again
            log.warning("ignoring latent cache %s (%s)", path, err)
    cache = encode_dataset(dataset, autoencoder, device, flip, bf16=bf16, progress=progress)
    if write:
        tensors = {"moments": cache.moments}
        if cache.flipped is not None:
            tensors["flipped"] = cache.flipped
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"fingerprint": key})
        os.replace(tmp, path)
    return cache
