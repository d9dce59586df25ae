"""Latent caching for stage 2: encode every image once with the frozen VAE, train on the moments.

The cache keeps the posterior moments (mean and log-variance), not one sample, so each step
still draws a fresh latent z ~ q(z|x) as uncached training does; with flips on, mirrored
images are encoded too (a VAE is not flip-equivariant).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.data.transforms import crop_flip, sample_generator, to_unit_range


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


@torch.no_grad()
def encode_dataset(dataset, autoencoder: nn.Module, device: torch.device, flip: bool,
                   batch_size: int = 32) -> LatentCache:
    """Encode a map-style image data set (centre crops) into a LatentCache on the CPU."""
    def encode(mirror: bool) -> Tensor:
        chunks = []
        for start in range(0, len(dataset), batch_size):
            images = []
            for index in range(start, min(start + batch_size, len(dataset))):
                image, _ = dataset.load_uint8(index)
                image = crop_flip(image, dataset.size, False, False, None)
                images.append(image.flip(-1) if mirror else image)
            posterior = autoencoder.encode(to_unit_range(torch.stack(images)).to(device))
            chunks.append(torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu())
        return torch.cat(chunks)

    return LatentCache(encode(False), list(dataset.captions), encode(True) if flip else None)
