"""Loads the compiled extension `ldm._C` once; a missing build is one warning, not a crash."""
from __future__ import annotations

import functools
import warnings


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
