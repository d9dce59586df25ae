"""Loads the compiled extension `ldm._C` once; a missing build is one warning, not a crash."""
from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def has_extension() -> bool:
    """True when `ldm._C` is importable (its ops are then registered under torch.ops.ldm)."""
    try:
        from ldm import _C  # noqa: F401  (import registers the ops)
    except ImportError as err:
        warnings.warn(f"ldm._C is not built ({err}); using the reference PyTorch path. "
                      "Build it with: pip install --no-build-isolation -e .", stacklevel=2)
        return False
    return True


@functools.cache
def has_kernel(op: str, device_type: str) -> bool:
    """True when torch.ops.ldm.<op> has a kernel for this device type (e.g. no CUDA in a CPU build)."""
    if not has_extension():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"ldm::{op}", key)
