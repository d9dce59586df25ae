"""The weights a run exports: live weights with the EMA averages swapped in."""
from __future__ import annotations

import torch
from torch import nn

from ldm.train.ema import EMA


def averaged_state(module: nn.Module, ema: EMA | None) -> dict[str, torch.Tensor]:
    """module.state_dict() with the EMA weights in place of the live ones (when there is an EMA)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if ema is not None:
        for name, value in ema.shadow.items():
            if name in state:
                state[name] = value.to(state[name].dtype).cpu().contiguous()
    return state
