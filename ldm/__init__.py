"""ldm: a latent diffusion toolkit (KL VAE, cross-attention U-Net, OpenCLIP text, fused kernels)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline


def load_pipeline(checkpoint: Any, config: Any = None, device: Any = "cpu", dtype: Any = None,
                  use_ema: bool = False) -> "Pipeline":
    """Load a Pipeline from a checkpoint; see ldm.pipeline.load_pipeline (imported lazily)."""
    import torch

    from ldm.pipeline import load_pipeline as _load
    return _load(checkpoint, config, device, torch.float32 if dtype is None else dtype, use_ema)
