"""Convolutions whose CPU inference calls use a oneDNN weight packed once, not on every call,
or Winograd's F(m x m, 3x3) algorithm (ldm.models.winograd), each switched on per module.

Eager `F.conv2d` on the CPU hands oneDNN the weight in PyTorch's plain layout, and oneDNN
reorders it into its blocked layout on every call: for the SD U-Net that is gigabytes of
weight traffic per step. PyTorch exposes the two halves inductor's freezing pass uses,
`mkldnn::_reorder_convolution_weight` (pack once) and `mkldnn::_convolution_pointwise`
(convolve with a packed weight); here they are used from eager code. Measured on an AVX2-only
AMD EPYC (Zen 3), fp32, channels_last: the SD 2.1-base U-Net at 32x32 latents in 0.88x the time
(docs/performance.md); whether it pays is measured per machine (ldm.inference.setup).

The packed path is taken only where it gives the same result as the plain one: CPU,
no autograd, channels_last input in the weight's dtype, zero padding. Anything else (training,
CUDA, NCHW activations, a CPU without oneDNN's bf16 convolutions) runs the plain convolution.
Packed copies are rebuilt when the weight changes (in-place update, dtype, device, memory
format); each costs one more copy of the convolution weights in memory (one per input shape,
at most two shapes). Winograd takes the same calls in fp32, for the input sides (H, W) a module
was told to use it for, with the tile side m told for each (set_winograd; the decision is
measured per layer, ldm.inference.winograd_plan), and keeps one transformed kernel per tile side it
uses ((m + 2)^2 / 9 the weight's size).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn

from ldm._extension import exporting
from ldm.models.winograd import TILES, transform_weight, winograd_conv2d

_WeightKey = tuple[int, int, torch.dtype]


def available() -> bool:
    """True when this PyTorch has oneDNN's packed-weight convolution ops."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def weight_key(weight: Tensor) -> _WeightKey | None:
    """What identifies a weight's values, or None when an in-place update could not be seen
    (inference tensors have no version counter)."""
    if weight.is_inference():
        return None
    return weight.data_ptr(), weight._version, weight.dtype


def can_pack(x: Tensor, weight: Tensor) -> bool:
    """Whether a call may use a packed weight (see the module docstring)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and not torch.compiler.is_compiling()
            and x.is_contiguous(memory_format=torch.channels_last))


def pack(weight: Tensor, x: Tensor, padding: Sequence[int], stride: Sequence[int],
         dilation: Sequence[int], groups: int) -> Tensor | None:
    """The weight in oneDNN's layout for inputs like x, or None where oneDNN has no such
    convolution (bf16 on a CPU without avx512bw/vl/dq or avx_ne_convert)."""
    try:
        return torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach(), list(padding), list(stride), list(dilation), groups, list(x.shape))
    except RuntimeError:
        return None


def packed_conv2d(x: Tensor, packed: Tensor, bias: Tensor | None, padding: Sequence[int],
                  stride: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """conv2d with a weight from `pack`; the output is channels_last, as the input."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, list(padding), list(stride), list(dilation), groups, "none", [], "")


class PackedWeight:
    """Packed copies of one weight, per input shape (oneDNN's blocked weight layout depends on
    the input's size: a copy packed for 64x64 inputs is reordered again on every 32x32 call),
    the last MAX_SHAPES shapes kept; all rebuilt when the weight's values change."""

    MAX_SHAPES = 2

    def __init__(self) -> None:
        self._key: _WeightKey | None = None
        self._packed: dict[tuple[int, ...], Tensor] = {}
        self.unsupported = False

    def get(self, weight: Tensor, x: Tensor, padding: Sequence[int], stride: Sequence[int],
            dilation: Sequence[int], groups: int) -> Tensor | None:
        key = weight_key(weight)
        if key is None or self.unsupported:
            return None
        if key != self._key:
            self._key, self._packed = key, {}
        shape = tuple(x.shape)
        packed = self._packed.pop(shape, None)  # re-inserted last: most recently used
        if packed is None:
            packed = pack(weight, x, padding, stride, dilation, groups)
            if packed is None:
                self.unsupported = True
                return None
            while len(self._packed) >= self.MAX_SHAPES:
                self._packed.pop(next(iter(self._packed)))
        self._packed[shape] = packed
        return packed

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Input shapes with a packed copy, least recently used first."""
        return list(self._packed)

    def clear(self) -> None:
        self._key, self._packed, self.unsupported = None, {}, False


class PrepackedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) whose eligible calls use a packed
    weight (`packing`) or, for fp32 inputs of the sides in `winograd_tiles` (side -> tile
    side m), Winograd's algorithm. Modules become one through `set_prepacked` or
    `set_winograd` (a class swap, so models keep building plain nn.Conv2d and checkpoints never
    see the difference)."""

    packed_weight: PackedWeight
    packing: bool = False
    winograd_tiles: Mapping[tuple[int, int], int] = MappingProxyType({})
    _winograd: Mapping[int, tuple[_WeightKey, Tensor]] = MappingProxyType({})

    def forward(self, x: Tensor) -> Tensor:
        if (self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and can_pack(x, self.weight) and not exporting()):
            m = self.winograd_tiles.get(tuple(x.shape[-2:]))
            if m is not None and x.dtype == torch.float32:
                u = self._winograd_weight(m)
                if u is not None:
                    return winograd_conv2d(x, u, self.bias)
            if self.packing:
                packed = self.packed_weight.get(self.weight, x, self.padding, self.stride,
                                                self.dilation, self.groups)
                if packed is not None:
                    return packed_conv2d(x, packed, self.bias, self.padding, self.stride,
                                         self.dilation, self.groups)
        return super().forward(x)

    def _winograd_weight(self, m: int) -> Tensor | None:
        """The kernel transformed for tile side m, rebuilt when the weight's values change;
        None for an inference-tensor weight (an in-place update could not be seen)."""
        key = weight_key(self.weight)
        if key is None:
            return None
        if m not in self._winograd or self._winograd[m][0] != key:
            self._winograd = {**self._winograd, m: (key, transform_weight(self.weight, m))}
        return self._winograd[m][1]


def winograd_applies(conv: nn.Module) -> bool:
    """Whether Winograd's F(m x m, 3x3) computes this convolution: 3x3, stride 1, zero padding
    1, no dilation or groups."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _set_class(conv: nn.Conv2d) -> None:
    """PrepackedConv2d while a fast path is on, plain nn.Conv2d otherwise."""
    if getattr(conv, "packing", False) or getattr(conv, "winograd_tiles", ()):
        conv.__class__ = PrepackedConv2d
        if not isinstance(getattr(conv, "packed_weight", None), PackedWeight):
            conv.packed_weight = PackedWeight()
    else:
        conv.__class__ = nn.Conv2d


def set_prepacked(module: nn.Module, enabled: bool, drop: bool = True) -> int:
    """Turn packing on or off for every convolution in `module` (plain nn.Conv2d become
    PrepackedConv2d), and tell modules with their own packed kernels (`prepacked` and
    `packed_kernels` attributes, e.g. the folded upsampling) to use them or not; returns how
    many modules changed. Winograd settings are left as they are.

    Packed copies already made are kept when enabling (they are rebuilt only if their weight
    changed) and dropped when disabling, unless `drop` is False (so a measurement can switch
    back and forth without packing on every call)."""
    enabled = enabled and available()
    changed = 0
    for sub in module.modules():
        if isinstance(getattr(sub, "packed_kernels", None), PackedWeight):
            sub.prepacked = enabled
            if not enabled and drop:
                sub.packed_kernels.clear()
            changed += 1
        if type(sub) in (nn.Conv2d, PrepackedConv2d) and getattr(sub, "packing", False) != enabled:
            sub.packing = enabled
            if not enabled and drop and hasattr(sub, "packed_weight"):
                sub.packed_weight.clear()
            _set_class(sub)
            changed += 1
    return changed


def set_winograd(module: nn.Module,
                 tiles: Callable[[nn.Conv2d], Mapping[tuple[int, int], int]]) -> int:
    """Give every convolution Winograd's algorithm applies to (winograd_applies) the input
    sides (H, W) it should use it for, each with its tile side m: `tiles(conv)`, empty for
    off; returns how many convolutions use it for at least one side. A layer keeps a
    transformed kernel per tile side in use instead of its packed copies."""
    using = 0
    for sub in module.modules():
        if type(sub) in (nn.Conv2d, PrepackedConv2d) and winograd_applies(sub):
            chosen = dict(tiles(sub))
            if any(m not in TILES for m in chosen.values()):
                raise ValueError(f"Winograd tile sides must be in {TILES}, got {chosen}")
            sub.winograd_tiles = MappingProxyType(chosen)
            # Kernels of tile sides no longer used are freed.
            sub._winograd = {m: k for m, k in getattr(sub, "_winograd", {}).items()
                             if m in chosen.values()}
            if chosen and isinstance(getattr(sub, "packed_weight", None), PackedWeight):
                # Packed copies made before (e.g. while timing the direct path) would only
                # hold memory: they are packed again if a direct call needs them.
                sub.packed_weight.clear()
            _set_class(sub)
            using += bool(chosen)
    return using
