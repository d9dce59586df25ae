"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016).

A 2x2 block of outputs of a 3x3 convolution (stride 1) depends on a 4x4 input tile. With the
transforms B (input), G (kernel) and A (output), every tile's output is
A^T [(G g G^T) * (B^T d B)] A, the product taken element by element over the 16 positions of the
transformed tile and summed over input channels. Summed over channels, the 16 products are 16
matrix products, (tiles x C_in) @ (C_in x C_out): 16 multiply-adds per channel pair and tile of 4
outputs, against 36 for the direct form (2.25x fewer). The transforms only add and subtract
(B, A) or halve (G), so in fp32 the result is as accurate as the direct convolution (about 3e-7
relative against fp64, oneDNN's direct kernels 1e-6).

What it costs instead: the transformed input and the 16 products are 4x the size of the input
and output, and the transforms are several memory passes; working in bands (BAND_BYTES) keeps
those in cache. Whether a layer uses it is measured per layer and machine (ldm.inference.setup),
and only fp32 inference calls on the CPU take it: bf16 would round the transformed values, and
oneDNN's bf16 convolutions are the faster path on CPUs with bf16 arithmetic.
"""
from __future__ import annotations

import torch
from torch import Tensor

# The transformed tiles and their products are 4x the size of the input and output. Worked in
# bands of tile rows whose largest temporary stays under this size, they come from the heap
# (fp32 blocks up to 32 MiB, ldm.runtime.tune_allocator) instead of fresh mappings that
# page-fault on every call, and stay in cache between the passes: at 320 channels and 64x64
# pixels that makes Winograd 0.6x of the direct convolution's time instead of 1.0x
# (docs/performance.md).
BAND_BYTES = 16 * 2**20


def _g_transform(g: Tensor, dim: int) -> Tensor:
    """G applied along `dim` (size 3 -> 4): g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2, the
    interpolation points 0, 1, -1 and infinity."""
    g0, g1, g2 = g.unbind(dim)
    return torch.stack((g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2), dim)


def transform_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) kernel -> the 16 transformed kernels G g G^T as (16, C_in, C_out),
    position (i, j) of the 4x4 transform at index 4 i + j; in fp32 (halving is exact, each
    value rounded twice: about 1e-7 relative)."""
    u = _g_transform(_g_transform(weight.detach().float(), 2), 3)  # (C_out, C_in, 4, 4)
    return u.permute(2, 3, 1, 0).reshape(16, weight.shape[1], weight.shape[0]).contiguous()


def _b_transpose(d: list[Tensor], out: Tensor) -> None:
    """out[0..3] = B^T (d0, d1, d2, d3): d0 - d2, d1 + d2, d2 - d1, d1 - d3."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _a_transpose(m: Tensor, out: Tensor) -> None:
    """out[0..1] = A^T (m0, m1, m2, m3): m0 + m1 + m2, m1 - m2 - m3."""
    torch.add(m[0], m[1], out=out[0])
    out[0] += m[2]
    torch.sub(m[1], m[2], out=out[1])
    out[1] -= m[3]


def winograd_conv2d(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias, padding=1) for a 3x3 weight given as transform_weight(weight);
    any H and W (odd sides compute one padded row or column more, then crop). The output is
    channels_last, and so is the input best (it is read as N, H, W, C)."""
    n, c, h, w = x.shape
    tiles_h, tiles_w = (h + 1) // 2, (w + 1) // 2
    padded = x.new_empty(n, 2 * tiles_h + 2, 2 * tiles_w + 2, c)
    padded[:, 0].zero_()
    padded[:, h + 1:].zero_()  # the bottom pad row, and one more when h is odd
    padded[:, :, 0].zero_()
    padded[:, :, w + 1:].zero_()
    padded[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    y = x.new_empty(n, 2 * tiles_h, 2 * tiles_w, u.shape[2])
    row_bytes = 16 * tiles_w * max(c, u.shape[2]) * x.element_size()
    rows = max(1, BAND_BYTES // row_bytes)
    if rows >= tiles_h:  # whole images per band
        images = rows // tiles_h
        for i in range(0, n, images):
            _band(padded[i:i + images], u, bias, y[i:i + images])
    else:
        for i in range(n):
            for r in range(0, tiles_h, rows):
                r_end = min(r + rows, tiles_h)
                _band(padded[i:i + 1, 2 * r:2 * r_end + 2], u, bias, y[i:i + 1, 2 * r:2 * r_end])
    if (2 * tiles_h, 2 * tiles_w) != (h, w):
        y = y[:, :h, :w].contiguous()
    return y.permute(0, 3, 1, 2)


def _band(padded: Tensor, u: Tensor, bias: Tensor | None, y: Tensor) -> None:
    """One band of tile rows: padded (N, 2 T_h + 2, 2 T_w + 2, C_in) -> y (N, 2 T_h, 2 T_w,
    C_out), both channels innermost."""
    n, _, _, c = padded.shape
    _, tiles_h, tiles_w, c_out = y.shape
    tiles_h, tiles_w = tiles_h // 2, tiles_w // 2
    # B^T applied to the tile rows d0..d3 (stride 2) ...
    d = [padded[:, k:k + 2 * tiles_h - 1:2] for k in range(4)]
    rows = padded.new_empty(4, n, tiles_h, 2 * tiles_w + 2, c)
    _b_transpose(d, rows)
    # ... and B to the columns, all four transformed rows at once: (4, 4, N, T_h, T_w, C).
    d = [rows[:, :, :, k:k + 2 * tiles_w - 1:2] for k in range(4)]
    v = padded.new_empty(4, 4, n, tiles_h, tiles_w, c)
    _b_transpose(d, v.transpose(0, 1))
    m = torch.bmm(v.view(16, -1, c), u).view(4, 4, n, tiles_h, tiles_w, c_out)
    if bias is not None:
        m[1, 1] += bias  # A^T M A adds M[1, 1] into all four outputs of a tile with weight 1
    # A^T over the rows i, then A over the columns j, written straight into the 2x2 phases.
    half = padded.new_empty(2, 4, n, tiles_h, tiles_w, c_out)
    _a_transpose(m, half)
    phases = y.view(n, tiles_h, 2, tiles_w, 2, c_out).permute(2, 4, 0, 1, 3, 5)
    _a_transpose(half.transpose(0, 1), phases.transpose(0, 1))
