"""ldm: a latent diffusion toolkit (KL VAE, cross-attention U-Net, OpenCLIP text, fused kernels).

    import ldm
    pipe = ldm.load_pipeline("model.safetensors")
    images = ldm.txt2img(pipe, ldm.SamplingOptions(prompt="a red circle on a blue background"))

The names below are imported on first use, so `import ldm` stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ldm.inference import SamplingOptions, load_pipeline, sample, txt2img
    from ldm.pipeline import Pipeline

_LAZY = {"load_pipeline": "ldm.inference", "Pipeline": "ldm.pipeline",
         "SamplingOptions": "ldm.inference", "txt2img": "ldm.inference", "sample": "ldm.inference"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
