"""Multi-head attention softmax(q k^T * scale) v: PyTorch's SDPA and our fused CPU bf16 kernel.

The fused kernel (csrc/cpu/attention.cpp) exists because on CPUs with avx512_bf16 but no AMX
(AMD Zen 4) PyTorch's CPU flash attention runs bf16 no faster than fp32, while bf16 dot
products (vdpbf16ps) are about 2.4x faster (docs/kernels.md).
It is an inference kernel: whenever autograd would record the call, SDPA runs instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm._extension import exporting, fused_device_types, has_extension
from ldm.cpu import cpu_info

# A fact of the build (the CPU kernel is compiled only for AVX-512 hosts), fixed at import.
_FUSED_DEVICES = fused_device_types("flash_attention")
# A fact of the machine, read at import too: reading /proc/cpuinfo from a torch.compile'd
# call would break its graph.
_AMX = cpu_info().amx_bf16
MAX_HEAD_DIM = 512  # the kernel's limit (SD U-Net heads are 40-160, the VAE's one head 512)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v in fp32 ([B, H, N, D] x [B, H, M, D]), cast back to q's dtype."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return out.to(q.dtype)


def fused_attention_wins() -> bool:
    """The fused kernel's bf16 dot products (avx512_bf16 vdpbf16ps) beat PyTorch's SDPA
    except where AMX tiles (amx_bf16) run oneDNN's matmuls: measured on a Xeon with AMX, SDPA
    took 1.46 ms per SD U-Net attention call against the fused kernel's 3.2 ms."""
    return not _AMX


def uses_fused_attention(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when flash_attention would run the fused kernel for these inputs."""
    return (q.device.type in _FUSED_DEVICES and fused_attention_wins() and q.dtype == torch.bfloat16
            and k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] <= MAX_HEAD_DIM
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
        return torch.ops.ldm.flash_attention(q, k, v, scale)
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
