"""Sampling under torchrun: each process takes a share of the batches, and every image keeps
the file name, seed and parameters it has in a single-process run.

The batches are listed in the single-process order (prompt after prompt, n_iter batches
each, seeds advancing by the batch size). Batch b goes to rank b mod world size. The file
numbers are assigned before any image is made: rank 0 lists the output folders once, takes
the numbers a single process would write one after another, and sends them to every rank,
so no two ranks ever pick the same name and nothing depends on who finishes first.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Bounded: the one collective happens before any model work, so a rank that never arrives
# means a broken job, not a slow one.
TIMEOUT = datetime.timedelta(minutes=5)
SAMPLE_FORMAT, GRID_FORMAT = "{:05d}.png", "grid-{:04d}.png"


@dataclass(frozen=True)
class World:
    """This process's place in the job (one process without torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0


@dataclass(frozen=True)
class Batch:
    """One batch of the global order as this process runs it.

    sample_numbers maps image index k to its file number, grid_number is the grid's; empty
    and None mean the next free number at write time (a single process).
    """
    prompt: str
    seed: int
    sample_numbers: dict[int, int] = field(default_factory=dict)
    grid_number: int | None = None


def world() -> World:
    """Rank and size from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def join(device: str) -> World:
    """Join the torchrun job, if any: NCCL with this rank's GPU as the current CUDA device
    (so "cuda" means it), Gloo on the CPU."""
    import torch.distributed as dist
    here = world()
    if here.size == 1 or dist.is_initialized():
        return here
    if device == "cuda":
        torch.cuda.set_device(here.local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=TIMEOUT)
    atexit.register(dist.destroy_process_group)  # a clean exit for torchrun, however run ends
    return here


def free_numbers(folder: Path, name_format: str, count: int) -> list[int]:
    """The numbers write_new_png picks for `count` files written one after another into
    `folder`: from one past the largest numeric PNG name, skipping names already taken."""
    names = {p.name for p in folder.glob("*.png")} if folder.is_dir() else set()
    number = 1 + max((int(Path(n).stem) for n in names if Path(n).stem.isdigit()), default=-1)
    numbers: list[int] = []
    while len(numbers) < count:
        if name_format.format(number) not in names:
            numbers.append(number)
        number += 1
    return numbers


def global_batches(prompts: list[str], n_iter: int, seed: int, batch_size: int) -> list[Batch]:
    """Every batch in the single-process order: n_iter per prompt, seeds advancing by batch_size."""
    order = [prompt for prompt in prompts for _ in range(n_iter)]
    return [Batch(prompt, seed + b * batch_size) for b, prompt in enumerate(order)]


def numbered(batches: list[Batch], batch_size: int, only: int | None, samples: Path,
             outdir: Path) -> list[Batch]:
    """The batches with file numbers in global order (all images, or image `only` of each)."""
    indices = list(range(batch_size)) if only is None else [only]
    sample_numbers = free_numbers(samples, SAMPLE_FORMAT, len(batches) * len(indices))
    grid_numbers = free_numbers(outdir, GRID_FORMAT, len(batches) if only is None else 0)
    return [Batch(batch.prompt, batch.seed,
                  {k: sample_numbers[b * len(indices) + j] for j, k in enumerate(indices)},
                  grid_numbers[b] if only is None else None)
            for b, batch in enumerate(batches)]


def local_batches(prompts: list[str], n_iter: int, seed: int, batch_size: int, only: int | None,
                  samples: Path, outdir: Path, device: str) -> list[Batch]:
    """This process's batches: all of them, numbered at write time, in a single process;
    under torchrun every world-size-th one with its file numbers fixed in advance."""
    batches = global_batches(prompts, n_iter, seed, batch_size)
    here = join(device)
    if here.size == 1:
        return batches
    import torch.distributed as dist
    box = [numbered(batches, batch_size, only, samples, outdir) if here.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # the folders are read once, before anyone writes
    return box[0][here.rank::here.size]
