"""Multi-head attention softmax(q k^T * scale) v: PyTorch's SDPA and our fused CPU bf16 kernels.

Two fused kernels, one per kind of CPU (docs/kernels.md has the measurements):
- `flash_attention` (csrc/cpu/attention.cpp) on avx512_bf16 dot products (vdpbf16ps): on CPUs
  without AMX (AMD Zen 4) PyTorch's CPU flash attention runs bf16 no faster than fp32.
- `flash_attention_amx` (csrc/cpu/attention_amx.cpp) on AMX tiles: on a Xeon with AMX,
  PyTorch's SDPA is bound by its exponentials, which this kernel computes more cheaply.
Both are inference kernels: whenever autograd would record the call, SDPA runs instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm._extension import exporting, fused_device_types, has_extension
from ldm.cpu import cpu_info

# Facts of the build (the CPU kernels are compiled only for AVX-512 hosts), fixed at import.
_FUSED_DEVICES = fused_device_types("flash_attention")
_AMX_DEVICES = fused_device_types("flash_attention_amx")


def _amx_tiles_usable() -> bool:
    """amx_bf16 among the CPU's flags, and the OS lets this process use the tiles (Linux 5.16+
    grants them on request: at::cpu::init_amx). Where it does not, the vdpbf16ps kernel runs."""
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    return cpu_info().amx_bf16 and init_amx is not None and bool(init_amx())


# A fact of the machine, read at import too: reading /proc/cpuinfo from a torch.compile'd
# call would break its graph.
_AMX = _amx_tiles_usable()
MAX_HEAD_DIM = 512  # the kernels' limit (SD U-Net heads are 40-160, the VAE's one head 512)
# Where the AMX kernel beats SDPA on a Xeon with AMX (bf16, two threads): head sizes 40-128
# took 0.60-0.77x of SDPA's time at 256-4096 tokens; 160 and 512 were level (1.02-1.07x).
AMX_MAX_HEAD_DIM = 128


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v in fp32 ([B, H, N, D] x [B, H, M, D]), cast back to q's dtype."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return out.to(q.dtype)


def fused_head_dim_limit() -> int:
    """The largest head size the fused kernel for this CPU takes (SDPA runs larger ones)."""
    return AMX_MAX_HEAD_DIM if _AMX else MAX_HEAD_DIM


def fused_attention_op() -> torch._ops.OpOverloadPacket:
    """The fused kernel for this CPU: AMX tiles where the CPU has them, vdpbf16ps elsewhere.
    Each beats PyTorch's SDPA where it runs (bf16, two threads, SD U-Net shapes): on AMD Zen 4
    the vdpbf16ps kernel took 0.36-0.48x of SDPA's time; on a Xeon with AMX it took 3.1-3.8x,
    and the AMX kernel 0.67-0.77x at 256-4096 tokens and 0.37-0.48x at 77 keys."""
    return torch.ops.ldm.flash_attention_amx if _AMX else torch.ops.ldm.flash_attention


def fused_attention_devices() -> frozenset[str]:
    """Device types on which fused_attention_op() has a kernel."""
    return _AMX_DEVICES if _AMX else _FUSED_DEVICES


def uses_fused_attention(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when flash_attention would run the fused kernel for these inputs."""
    return (q.device.type in fused_attention_devices() and q.dtype == torch.bfloat16
            and k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] <= fused_head_dim_limit()
            and k.shape[-2] > 0 and not exporting()
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                  or v.requires_grad)))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v for [B, H, N, D] inputs; scale defaults to 1/sqrt(D).

    CPU bf16 inference runs the fused kernel, whose result is stored as [B, N, H, D] (so
    `.transpose(1, 2).reshape(B, N, H * D)` is free). Everything else runs PyTorch's SDPA,
    which computes bf16 softmax statistics in fp32 on the CPU and CUDA alike.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if uses_fused_attention(q, k, v):
        return fused_attention_op()(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _fake_flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Shape and strides of the result: [B, H, N, D] stored as [B, N, H, D]."""
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "ldm::flash_attention: q, k, v must be [B, H, L, D]")
    torch._check(k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3],
                 lambda: f"ldm::flash_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                 f"v {tuple(v.shape)} do not match")
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d)).transpose(1, 2)


if has_extension():
    torch.library.register_fake("ldm::flash_attention")(_fake_flash_attention)
    torch.library.register_fake("ldm::flash_attention_amx")(_fake_flash_attention)
