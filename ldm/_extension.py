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


def fused_device_types(op: str) -> frozenset[str]:
    """Device types ("cpu", "cuda") for which torch.ops.ldm.<op> has a compiled kernel."""
    if not has_extension():
        return frozenset()
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"ldm::{op}", key))


def exporting() -> bool:
    """True while TorchScript traces the call (openvino.convert_model, torch.onnx's exporter):
    the graph is for another runtime, so modules take their plain-PyTorch form (no ldm ops,
    no cached or packed kernels) and that runtime makes its own kernel choices."""
    return torch.jit.is_tracing()
