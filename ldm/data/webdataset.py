"""WebDataset tar shards (`name.png|jpg|jpeg|webp` + `name.txt` per sample) streamed per rank.

Each rank reads its own shards (shards[rank::world]) in an order reshuffled every epoch from
the seed, through a small seeded shuffle buffer, so the stream is deterministic; the data
position of a checkpoint is the number of batches consumed, and a resumed run skips that
many samples without decoding them. Unreadable images are skipped with a count.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError

from ldm.data.folder import DataError
from ldm.data.transforms import crop_flip, resize_short_side, sample_generator, to_unit_range

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
SHUFFLE_BUFFER = 256


def list_shards(spec: str) -> list[str]:
    """Shard paths from a folder (every *.tar), a brace pattern (a-{000..009}.tar) or a comma list."""
    from webdataset.shardlists import expand_urls
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    else:
        shards = [s for part in spec.split(",") if part.strip() for s in expand_urls(part.strip())]
    missing = [s for s in shards if "://" not in s and not Path(s).is_file()]
    if not shards or missing:
        raise DataError(f"no WebDataset shards at {spec!r}" + (f" ({missing[0]} missing)" if missing else ""))
    return shards


class ShardStream:
    """This rank's infinite, resumable stream of (image, caption) batches from tar shards."""

    def __init__(self, config, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        shards = list_shards(config.path)
        if len(shards) < world_size:
            raise DataError(f"{len(shards)} shard(s) cannot feed {world_size} ranks; write at least one per rank")
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} is not divisible by {world_size} ranks")
        self.config, self.seed, self.rank = config, seed, rank
        self.shards = shards[rank::world_size]
        self.local = global_batch // world_size
        self.skipped = 0

    def _raw(self) -> Iterator[tuple[bytes, str]]:
        """(image bytes, caption) forever, epoch after epoch, through the seeded shuffle buffer."""
        import webdataset as wds
        epoch = 0
        buffer: list[tuple[bytes, str]] = []
        pick = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank)
        while True:
            order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(
                self.seed * 7_919 + epoch * 131 + self.rank))
            urls = [self.shards[i] for i in order]
            dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     handler=wds.warn_and_continue, empty_check=False)
            count = 0
            for sample in dataset:
                key = next((k for k in IMAGE_KEYS if k in sample), None)
                if key is None:
                    continue
                caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
                if not caption and self.config.require_captions:
                    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no "
                                    ".txt caption; set data.require_captions=false to allow that")
                buffer.append((sample[key], caption))
                count += 1
                if len(buffer) >= SHUFFLE_BUFFER:
                    yield buffer.pop(int(torch.randint(len(buffer), (1,), generator=pick)))
            if count == 0:
                raise DataError(f"the shards {self.shards[:2]}... hold no images")
            epoch += 1

    def _decode(self, raw: bytes, seed: int) -> torch.Tensor | None:
        try:
            with Image.open(io.BytesIO(raw)) as image:
                resized = resize_short_side(image, self.config.size)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            self.skipped += 1
            log.warning("skipped an unreadable image in the shards (%d so far)", self.skipped)
            return None
        random_crop, flip = self.config.crop == "random", self.config.flip
        generator = sample_generator(seed) if (random_crop or flip) else None
        return to_unit_range(crop_flip(resized, self.config.size, random_crop, flip, generator))

    def batches_from(self, position: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Batches starting at data position `position` (batches already consumed)."""
        stream = self._raw()
        index = 0
        for _ in range(position * self.local):
            next(stream)
            index += 1
        while True:
            images, captions = [], []
            while len(images) < self.local:
                raw, caption = next(stream)
                image = self._decode(raw, self.seed * 1_000_003 + index * 8 + self.rank)
                index += 1
                if image is not None:
                    images.append(image)
                    captions.append(caption)
            yield torch.stack(images), captions

    def preview(self, count: int) -> torch.Tensor:
        """The first `count` readable images of the stream (for reconstruction grids)."""
        return next(iter(_take(self.batches_from(0), count)))


def _take(batches: Iterator[tuple[torch.Tensor, list[str]]], count: int) -> Iterator[torch.Tensor]:
    images = []
    for batch, _ in batches:
        images.extend(batch)
        if len(images) >= count:
            yield torch.stack(images[:count])
            return
