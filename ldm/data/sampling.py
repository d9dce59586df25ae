"""Deterministic, resumable, rank-sharded batches over a map-style dataset.

The sample stream is the concatenation of per-epoch permutations of range(n) drawn from
the run's seed; global batch b is positions [b*G, (b+1)*G) of that stream and rank r takes
its contiguous slice. So the union of the ranks' batches is the single-process batch
(results depend on the number of ranks only through the batch split), and the whole data
position is one integer: the number of batches consumed.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch


class ShardedBatches:
    """Infinite iterator of this rank's (index, augmentation seed) lists, resumable by position."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, position: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by {world_size} ranks")
        self.n, self.global_batch, self.seed = num_samples, global_batch, seed
        self.local = global_batch // world_size
        self.offset = rank * self.local
        self.position = position  # batches already consumed
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=generator), epoch
        return self._perm

    def batch(self, position: int) -> list[tuple[int, int]]:
        """This rank's share of global batch `position`."""
        start = position * self.global_batch + self.offset
        items = []
        for stream_pos in range(start, start + self.local):
            epoch, i = divmod(stream_pos, self.n)
            # The augmentation seed names the stream position, so a resumed run re-draws it.
            items.append((int(self._permutation(epoch)[i]), self.seed * 1_000_003 + stream_pos))
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            items = self.batch(self.position)
            self.position += 1
            yield items


def collate(samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """Stack images, keep captions as a list."""
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def batch_iterator(dataset: torch.utils.data.Dataset, batches: ShardedBatches, num_workers: int = 0,
                   collate_fn: Callable = collate) -> Iterator:
    """Batches from `dataset` in `batches` order; workers (if any) prefetch without changing the order."""
    if num_workers <= 0:
        for items in batches:
            yield collate_fn([dataset[item] for item in items])
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=collate_fn, persistent_workers=False,
                                         prefetch_factor=2)
    yield from loader
