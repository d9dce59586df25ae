"""From a DataConfig to the loop's `batches_from(position)`: map-style folders or streamed shards."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ldm.data.folder import ImageFolder
from ldm.data.sampling import ShardedBatches, batch_iterator, collate
from ldm.train.config import DataConfig
from ldm.train.distributed import DistInfo


def build_dataset(config: DataConfig) -> ImageFolder:
    """The map-style data set of the config (data.kind=folder)."""
    return ImageFolder(config.path, config.size, random_crop=config.crop == "random", flip=config.flip,
                       require_captions=config.require_captions, in_memory=config.in_memory)


def preview_images(dataset: torch.utils.data.Dataset, count: int) -> torch.Tensor:
    """The first `count` images, centre-cropped and unflipped (fixed across the run)."""
    images = []
    for index in range(min(count, len(dataset))):
        image, _ = dataset.load_uint8(index)
        size = dataset.size
        _, h, w = image.shape
        top, left = (h - size) // 2, (w - size) // 2
        images.append(image[:, top:top + size, left:left + size].float() / 127.5 - 1.0)
    return torch.stack(images)


def map_batches(dataset: torch.utils.data.Dataset, batch_size: int, seed: int, info: DistInfo,
                num_workers: int, collate_fn: Callable = collate) -> Callable[[int], Iterator]:
    """position -> iterator over this rank's micro-batches, starting at that data position."""
    def batches_from(position: int) -> Iterator:
        batches = ShardedBatches(len(dataset), batch_size, info.rank, info.world_size, seed, position)
        return batch_iterator(dataset, batches, num_workers, collate_fn)
    return batches_from


def make_batches(config: DataConfig, batch_size: int, seed: int, info: DistInfo
                 ) -> tuple[Callable[[int], Iterator], torch.Tensor]:
    """(batches_from, preview images) for a training config."""
    if config.kind == "webdataset":
        from ldm.data.webdataset import ShardStream
        stream = ShardStream(config, batch_size, seed, info.rank, info.world_size)
        return stream.batches_from, stream.preview(8)
    dataset = build_dataset(config)
    return map_batches(dataset, batch_size, seed, info, config.num_workers), preview_images(dataset, 8)


__all__ = ["build_dataset", "make_batches", "map_batches", "preview_images"]
