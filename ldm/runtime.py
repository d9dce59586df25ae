"""Process set-up for fast CPU inference: thread count and glibc allocator behaviour.

Called explicitly by scripts at start-up (never at import). Why the allocator: glibc serves
large blocks with mmap and returns freed heap tops to the OS, so every large activation of the
next network call page-faults again (5-15% of a U-Net forward on a CPU). Raising the mmap and
trim thresholds keeps freed pages of all but the largest blocks in the process for reuse.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# Blocks above this many MiB are mapped per use (see tune_allocator), by activation dtype.
_MMAP_THRESHOLD_MIB = {torch.float32: 32, torch.float64: 32, torch.bfloat16: 8, torch.float16: 8}


def _glibc_function(name: str) -> "ctypes._CFuncPtr | None":
    """A function of the C library on Linux (None elsewhere, or on a libc without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # musl or another libc without it
        return None


def release_free_memory() -> bool:
    """Hand freed heap pages back to the OS once (glibc malloc_trim); False off glibc.

    With trimming disabled (tune_allocator), memory freed when a network is built in fp32 and
    converted to bf16 stays resident, and so do the U-Net's activations while the VAE decodes;
    one call after loading and one before decoding hand both back (docs/performance.md)."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def tune_allocator(heap_only: bool = False, dtype: torch.dtype = torch.float32) -> bool:
    """Keep freed memory for reuse (no trimming; blocks up to 32 MiB from the heap for fp32
    activations, 8 MiB for bf16/fp16, or every block with `heap_only`); False off glibc.

    Blocks up to the threshold come from the heap and stay mapped when freed; larger ones are
    mapped per use and go back to the OS on free. The thresholds (_MMAP_THRESHOLD_MIB):
    - bf16/fp16 8 MiB: with 32 MiB (glibc's largest dynamic threshold) the heap keeps the
      high-water mark of the U-Net's transient blocks, which creeps up over the steps; 8 MiB
      keeps peak memory lower at the same speed.
    - fp32 32 MiB: the SD U-Net's 10-21 MiB fp32 activations would otherwise page-fault on
      every call.
    - Heap-only allocation (M_MMAP_MAX = 0) is as fast, but the VAE decoder's ever-larger
      activations fragment the heap and raise peak memory, so only the kernel benchmark uses
      `heap_only`: a memory-bound kernel on a fresh mapped block pays its page faults, which
      would dominate its time.
    Measured effects: docs/performance.md.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    threshold = _MMAP_THRESHOLD_MIB.get(dtype, 32) * 2**20
    ok = mallopt(_M_MMAP_MAX, 0) if heap_only else mallopt(_M_MMAP_THRESHOLD, threshold)
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never hand the heap top back to the OS
    return bool(ok)


_THP_THRESHOLD_BYTES = 2 * 2**20  # PyTorch madvises blocks of this size and more
_THP_POLICY = "/sys/kernel/mm/transparent_hugepage/enabled"


def enable_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages on blocks of 2 MiB and more
    (Linux); returns huge_pages_on().

    The allocator page-aligns such blocks and madvises them MADV_HUGEPAGE when
    THP_MEM_ALLOC_ENABLE=1, and reads the variable once, at its first allocation: call this
    before any tensor is made. An explicit THP_MEM_ALLOC_ENABLE is left as it is. Off by
    default: whole networks run no faster with it (docs/performance.md)."""
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return huge_pages_on()


def huge_pages_on() -> bool:
    """Whether large CPU tensors get transparent huge pages: PyTorch's allocator is in its
    huge-page mode (blocks of 2 MiB and more page-aligned; otherwise 64-byte aligned, so four
    page-aligned probes by chance are a 1 in 16 million event) and the kernel's THP policy is
    not 'never'."""
    probes = [torch.empty(_THP_THRESHOLD_BYTES // 4 + 1) for _ in range(4)]
    if not all(p.data_ptr() % 4096 == 0 for p in probes):
        return False
    try:
        with open(_THP_POLICY) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def setup_cpu(threads: int | None = None, allocator: bool = True,
              dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """Set torch's intra-op threads and (optionally) the allocator for activations of dtype;
    returns what was done."""
    if threads is not None:
        torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(),
            "allocator_tuned": allocator and tune_allocator(dtype=dtype)}
