"""Writing the usable model files (what load_autoencoder / load_pipeline read) from a run."""
from __future__ import annotations

import json
import os
from pathlib import Path

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


def write_model_file(path: Path, tensors: dict[str, torch.Tensor], ldm_config: dict) -> None:
    """Atomic safetensors file with the config JSON under metadata "ldm_config"."""
    try:
        from ldm.checkpoint import write_checkpoint
    except ImportError:  # before ldm.checkpoint exists: same layout, written here
        write_checkpoint = None
    metadata = {"ldm_config": json.dumps(ldm_config)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if write_checkpoint is not None:
        write_checkpoint(path, tensors, metadata)
        return
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
