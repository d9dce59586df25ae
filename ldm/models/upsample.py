"""Nearest 2x upsampling followed by a 3x3 convolution, without building the upsampled image.

After nearest upsampling, output pixel (2i + a, 2j + b) sees only the input rows
{i - 1 + a, i + a} and columns {j - 1 + b, j + b}: of the kernel's three rows, phase a = 0
applies row 0 to input row i - 1 and rows 1 + 2 to row i; phase a = 1 applies rows 0 + 1 to
row i and row 2 to row i + 1 (columns alike). So the 3x3 kernel folds into one 2x2 kernel per
phase (a, b), and one 2x2 convolution of the zero-padded input with the four phase kernels
stacked as 4 * C_out output channels computes every output pixel: 4 * 4 = 16 multiply-adds
per input-output channel pair and input pixel against 4 * 9 = 36 for the direct form (2.25x
fewer), and no 4x larger upsampled tensor. Measured on two AMD Zen 4 cores (fp32), the
upsampling blocks of the SD VAE decoder and U-Net run 1.8-2.2x faster (docs/performance.md);
outputs match the direct form to about 1e-6 relative (the folded weights are sums, rounded once).

Fewer multiply-adds need not mean less time: the four phases are written apart by strided
copies, and the direct form's convolution may run faster per multiply-add (AMX tiles, or
Winograd's F(4x4, 3x3) in fp32 at 2.25 multiplies per output against folding's 4). So each
block can be told to take the direct form for given input sides (set_upsampling; the choice is
measured per machine, ldm.inference.upsample_plan).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm._extension import exporting
from ldm.models.prepacked import PackedWeight, can_pack, packed_conv2d, weight_key

# _FOLD[a][tap][row]: which of the 3x3 kernel's rows phase a adds into its 2-row tap.
_FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def phase_kernels(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) kernel -> (4 C_out, C_in, 2, 2) kernels, phase p = 2a + b first."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # fold bf16/fp16 in fp32
    fold = torch.tensor(_FOLD, dtype=dtype, device=weight.device)
    kernels = torch.einsum("aph,oihw,bqw->aboipq", fold, weight.to(dtype), fold)
    return kernels.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def is_channels_last(x: Tensor) -> bool:
    """True for a 4-d tensor laid out channels_last and not also plain contiguous."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()


def upsample_conv(x: Tensor, kernels: Tensor, bias: Tensor | None,
                  packed: Tensor | None = None) -> Tensor:
    """conv3x3(nearest_upsample_2x(x)) from the phase kernels (see the module docstring),
    or from their oneDNN-packed copy (ldm.models.prepacked) when given.

    The output keeps x's memory format (channels_last or contiguous).
    """
    n, _, h, w = x.shape
    c_out = kernels.shape[0] // 4
    channels_last = is_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bias4 = None if bias is None else bias.repeat(4)
    if packed is not None:
        phases = packed_conv2d(x, packed, bias4, (1, 1), (1, 1), (1, 1), 1)
    else:
        phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels.contiguous(memory_format=fmt),
                          bias4)  # (N, 4 C_out, H + 1, W + 1)
    y = torch.empty((n, c_out, 2 * h, 2 * w), dtype=phases.dtype, device=x.device,
                    memory_format=fmt)
    # y viewed as (N, C, H, a, W, b) so each phase is one strided copy.
    y_phases = y.view(n, c_out, h, 2, w, 2) if not channels_last else \
        y.permute(0, 2, 3, 1).view(n, h, 2, w, 2, c_out).permute(0, 5, 1, 2, 3, 4)
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            y_phases[:, :, :, a, :, b].copy_(phases[:, p * c_out:(p + 1) * c_out, a:a + h, b:b + w])
    return y


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution (key `conv`; U-Net and VAE alike).

    Computed by `upsample_conv`; a target size other than 2x (given to forward) takes the
    direct form, nearest interpolation to that size then the convolution. Without gradients
    the folded kernels are cached and refolded when the weight changes (in-place update, dtype,
    device or memory-format change); with `prepacked` set (ldm.models.prepacked.set_prepacked)
    they are also packed for oneDNN once. Inputs of the sides in `direct_sides` (set_upsampling)
    take the direct form, nearest 2x then `conv`.
    """

    direct_sides: frozenset[tuple[int, int]] = frozenset()

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._folded: tuple[tuple, Tensor] | None = None
        self.prepacked = False
        self.packed_kernels = PackedWeight()

    def _kernels(self, channels_last: bool) -> Tensor:
        weight = self.conv.weight
        if ((torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling()
                or weight.is_inference()):
            # Inference tensors (weights made under torch.inference_mode) have no version
            # counter, so an in-place update could not be seen: fold on every call instead.
            return phase_kernels(weight)
        # Cached in the memory format of the input, so no call re-lays the kernels out (a
        # 5120x1280x2x2 relayout cost 40 ms per call in the SD U-Net).
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, channels_last)
        if self._folded is None or self._folded[0] != key:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            # A normal tensor even inside inference_mode: the packed copy is keyed by the
            # kernels' version counter, which an inference tensor lacks.
            with torch.inference_mode(False):
                self._folded = (key, phase_kernels(weight.detach()).contiguous(memory_format=fmt))
        return self._folded[1]

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Upsample to `size` (default: 2x) with nearest neighbours, then convolve."""
        # The textbook form for another runtime, or where it measured faster (equal for 2x, see
        # above).
        if exporting() or tuple(x.shape[-2:]) in self.direct_sides:
            return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0,
                                           mode="nearest"))
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            kernels = self._kernels(is_channels_last(x))
            # Only cached kernels are packed: those refolded on every call (inference-tensor
            # weights) could reuse a freed kernel's address and hit a stale packed copy.
            cached = weight_key(self.conv.weight) is not None
            packed = (self.packed_kernels.get(kernels, x, (1, 1), (1, 1), (1, 1), 1)
                      if self.prepacked and cached and can_pack(x, self.conv.weight) else None)
            return upsample_conv(x, kernels, self.conv.bias, packed)
        # Any other size (the U-Net's odd skips: 2h - 1 rows) changes the phases at the far
        # border, where the 3x3 window meets zero padding instead of a repeated row; the
        # direct form is exact there and such sizes are rare.
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


def set_upsampling(module: nn.Module,
                   direct_sides: Callable[[Upsample], Iterable[tuple[int, int]]]) -> int:
    """Tell every Upsample in `module` the input sides (H, W) it should compute in the direct
    form, `direct_sides(block)` (empty: folded throughout); returns how many take the direct
    form for at least one side. Their folded kernels and packed copies are let go (made again
    if a folded call needs them)."""
    direct = 0
    for sub in module.modules():
        if isinstance(sub, Upsample):
            sub.direct_sides = frozenset(tuple(side) for side in direct_sides(sub))
            if sub.direct_sides:
                sub._folded = None
                sub.packed_kernels.clear()
            direct += bool(sub.direct_sides)
    return direct
