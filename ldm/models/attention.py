"""Cross-attention transformer blocks of the U-Net (SD's ldm/modules/attention.py layout)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.kernels.attention import flash_attention
from ldm.models.layers import GroupNormSiLU, zero_module
from ldm.models.packed_linear import PackedMatrix, can_pack, linear_packed, linear_packed_times

_REDUCED = (torch.float16, torch.bfloat16)


def sdpa_needs_upcast(q: Tensor) -> bool:
    """SD computes the softmax in fp32 (_ATTN_PRECISION). The fused SDPA kernels of CUDA and of
    the CPU for bf16 (PyTorch's and ours: fp32 logits, max and sum) do so already; upcasting
    there only costs copies and fp32 matmuls."""
    if q.dtype not in _REDUCED or q.device.type == "cuda":
        return False
    return not (q.device.type == "cpu" and q.dtype == torch.bfloat16)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v: [B, N, H*d] x [B, M, H*d] -> [B, N, H*d]."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    dtype = q.dtype
    if sdpa_needs_upcast(q):
        q, k, v = q.float(), k.float(), v.float()
    out = flash_attention(q, k, v)  # scale 1/sqrt(d); CPU bf16 inference: ldm's fused kernel
    return out.to(dtype).transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    """Attention of x to a context (itself when context is None); keys to_q/to_k/to_v/to_out."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection: x W_a * gelu(x W_b) (Shazeer 2020).

    With `packing` (ldm.models.packed_linear.set_packed_linear) CPU inference multiplies by
    the two halves of the weight apart, GELU and product inside oneDNN's matrix multiply."""

    packing = False
    packed_halves: tuple[PackedMatrix, PackedMatrix] | None = None

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.proj.weight, self.proj.bias
        if self.packing and self.packed_halves is not None and can_pack(x, weight):
            value, gate = (half.get(weight) for half in self.packed_halves)
            if value is not None and gate is not None:
                b_value, b_gate = (None, None) if bias is None else bias.chunk(2)
                return linear_packed_times(x, linear_packed(x, gate, b_gate, "gelu"), value,
                                           b_value)
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x expansion; keys net.0.proj and net.2."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, feed-forward; all residual.

    With `disable_self_attn` the first attention also attends to the context instead of x
    (SD's x4 upscaler at its high-resolution levels; attention.py BasicTransformerBlock).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int,
                 dropout: float = 0.0, disable_self_attn: bool = False) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads,
                                    dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image-shaped transformer: norm, proj_in (1x1 conv or linear), blocks, proj_out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int,
                 depth: int = 1, use_linear: bool = False, dropout: float = 0.0,
                 disable_self_attn: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        # SD's attention.Normalize: GroupNorm(32, eps=1e-6), no SiLU (not the U-Net's 1e-5).
        self.norm = GroupNormSiLU(channels, 32, eps=1e-6, silu=False)
        if use_linear:  # SD 2.x
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = zero_module(nn.Linear(inner, channels))
        else:  # SD 1.x: 1x1 convolutions
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, disable_self_attn)
            for _ in range(depth))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
