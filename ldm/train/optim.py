"""AdamW with linear warm-up and optional cosine decay, and the gradient clipping helper."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ldm.train.config import OptimConfig


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of config.lr at optimizer step `step` (0-based)."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.decay == "cosine":
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine
    return 1.0


def make_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig, total_steps: int,
                   lr: float | None = None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` plus a LambdaLR implementing warm-up/decay."""
    params = [p for p in params if p.requires_grad]
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor Python loop
    # torch picks on the CPU by default; it matters when a large token embedding is trained.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                 for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr or config.lr, betas=tuple(config.betas),
                                  eps=config.eps, weight_decay=config.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, total_steps))
    return optimizer, scheduler
