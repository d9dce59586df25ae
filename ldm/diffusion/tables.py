"""Small per-step tables (sampler coefficients, timesteps) moved to the latents' device."""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(table: Tensor, device: torch.device | str) -> Tensor:
    """A small host table moved to `device`, safely while a CUDA graph is being captured.

    During capture a host-to-device copy is refused (unpinned memory) or would read a
    since-freed buffer at replay (pinned), so there the values are written by fill kernels
    whose scalars live in the graph itself.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return table.to(device)
    out = torch.empty(table.shape, dtype=table.dtype, device=device)
    flat = out.view(-1)
    for i, value in enumerate(table.reshape(-1).tolist()):
        flat[i].fill_(value)
    return out
