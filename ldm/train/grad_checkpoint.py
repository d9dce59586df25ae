"""Gradient checkpointing for any network: recompute chosen blocks in backward instead of storing."""
from __future__ import annotations

import functools

import torch.utils.checkpoint
from torch import nn


def enable_gradient_checkpointing(module: nn.Module, block_types: tuple[type, ...]) -> int:
    """Wrap forward of every submodule of `block_types` in torch.utils.checkpoint; returns the count."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, block_types):
            inner = sub.forward

            @functools.wraps(inner)
            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            sub.forward = forward
            count += 1
    return count
