"""Linear layers whose CPU inference calls use a oneDNN weight packed once, and the GEGLU
projection with its GELU and gate product done inside oneDNN's matrix multiply.

Eager `F.linear` hands oneDNN (or MKL) the weight in PyTorch's plain layout, reordered on every
call, and GEGLU's projection writes an 8x-wide activation that `gelu` and the product read and
write again. PyTorch exposes what inductor's freezing pass uses for both,
`mkldnn::_reorder_linear_weight` (pack once) and `mkldnn::_linear_pointwise` (multiply by a
packed weight, with a unary post-op such as "gelu" or a binary one such as "mul" applied to the
accumulator before it is stored). GEGLU then becomes two half-width products,
gate = gelu(x W_g + b_g) and out = (x W_a + b_a) * gate, with nothing written in between but
the gate. Measured on an Intel Xeon with AMX, SD 2.1-base shapes: GEGLU in 0.48-0.55x the
eager time in bf16, 0.66-0.78x in fp32; plain linears 0.77-0.97x (docs/performance.md).
Whether it pays is measured per machine (ldm.inference.setup.choose_packed_linear).

The packed path is taken only where it gives the same result as the plain one up to rounding:
CPU, no autograd, input in the weight's dtype (fp32 or bf16), outside tracing and compiling.
In bf16 it rounds once where eager rounds the projection and the GELU to bf16 as well (closer
to fp32: relative L2 error 2.3e-3 against eager's 3.4e-3). Packed copies are rebuilt when the
weight changes (in-place update, dtype, device) and cost one more copy of the weights.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm._extension import exporting
from ldm.models.prepacked import weight_key


def available() -> bool:
    """True when this PyTorch has oneDNN's packed-weight linear ops."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def can_pack(x: Tensor, weight: Tensor) -> bool:
    """Whether a call may use a packed weight (see the module docstring)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and not torch.compiler.is_compiling() and not exporting())


class PackedMatrix:
    """One weight matrix (or one of its two row halves) packed for oneDNN, repacked when the
    weight's values change; `unsupported` once oneDNN has refused it."""

    def __init__(self, half: int | None = None) -> None:
        self.half = half
        self._key: tuple | None = None
        self._packed: Tensor | None = None
        self.unsupported = False

    def get(self, weight: Tensor) -> Tensor | None:
        key = weight_key(weight)
        if key is None or self.unsupported:
            return None
        if key != self._key:
            if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                self.unsupported = True  # oneDNN's bf16 needs avx512bw/vl/dq or avx_ne_convert
                return None
            try:
                block = weight.detach()
                block = (block if self.half is None else block.chunk(2)[self.half]).contiguous()
                self._packed = torch.ops.mkldnn._reorder_linear_weight(block)
            except RuntimeError:
                self.unsupported, self._packed = True, None
                return None
            self._key = key
        return self._packed

    def clear(self) -> None:
        self._key, self._packed, self.unsupported = None, None, False


def linear_packed(x: Tensor, packed: Tensor, bias: Tensor | None, post_op: str = "none") -> Tensor:
    """x W^T + b with W packed (PackedMatrix); post_op "gelu" applies the exact GELU."""
    algorithm = "none" if post_op == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, post_op, [],
                                             algorithm)


def linear_packed_times(x: Tensor, other: Tensor, packed: Tensor,
                        bias: Tensor | None) -> Tensor:
    """(x W^T + b) * other with W packed, the product taken before the result is stored."""
    return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other.contiguous(), packed,
                                                    bias, "mul")


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose eligible calls use a packed
    weight. Modules become one through `set_packed_linear` (a class swap, so models keep
    building plain nn.Linear and checkpoints never see the difference)."""

    packed_weight: PackedMatrix

    def forward(self, x: Tensor) -> Tensor:
        if can_pack(x, self.weight):
            packed = self.packed_weight.get(self.weight)
            if packed is not None:
                return linear_packed(x, packed, self.bias)
        return super().forward(x)


def set_packed_linear(module: nn.Module, enabled: bool, drop: bool = True) -> int:
    """Packing on or off for every nn.Linear in `module`, and for modules that multiply by the
    two row halves of a weight apart (`packing` and `packed_halves` attributes, e.g. GEGLU);
    returns how many modules changed. Packed copies are dropped when disabling, unless `drop`
    is False (so a measurement can switch back and forth without packing on every call)."""
    enabled = enabled and available()
    changed = 0
    for sub in module.modules():
        if hasattr(sub, "packed_halves") and sub.packing != enabled:
            sub.packing = enabled
            if enabled and sub.packed_halves is None:
                sub.packed_halves = (PackedMatrix(0), PackedMatrix(1))
            elif not enabled and drop:
                sub.packed_halves = None
            changed += 1
        if type(sub) in (nn.Linear, PackedLinear) and isinstance(sub, PackedLinear) != enabled:
            sub.__class__ = PackedLinear if enabled else nn.Linear
            if enabled and not isinstance(getattr(sub, "packed_weight", None), PackedMatrix):
                sub.packed_weight = PackedMatrix()
            elif not enabled and drop:
                del sub.packed_weight
            changed += 1
    return changed


def is_packed_linear(module: nn.Module) -> bool:
    """Whether set_packed_linear switched packing on in `module`."""
    return any(isinstance(sub, PackedLinear) for sub in module.modules())
