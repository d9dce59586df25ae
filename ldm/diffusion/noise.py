"""Gaussian noise from explicit generators; one generator per image keeps seeds per image."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal [*shape]; with a list of generators, row k comes from generator k.

    Noise is drawn on each generator's own device and then moved, so a CPU generator gives the
    same numbers whatever device the latents live on.
    """
    if generator is None:
        raise ValueError("randomness needs an explicit torch.Generator (or pass the noise tensor)")
    if isinstance(generator, torch.Generator):
        out = torch.randn(tuple(shape), generator=generator, device=generator.device)
        return out.to(device=device, dtype=dtype)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device).to(device) for g in generators]
    return torch.stack(rows).to(dtype)


def seeded_generators(seed: int, count: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """Generators seeded seed, seed + 1, ...: image k of a batch equals the single image of seed + k."""
    return [torch.Generator(device=device).manual_seed(seed + k) for k in range(count)]
