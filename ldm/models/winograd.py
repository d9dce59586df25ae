"""3x3 convolutions by Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4 (Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016; their transform matrices and the
tile transforms are in ldm.kernels.winograd).

An m x m block of outputs of a 3x3 convolution (stride 1) depends on an a x a input tile,
a = m + 2. With the transforms B (input), G (kernel) and A (output), every tile's output is
A^T [(G g G^T) * (B^T d B)] A, the product taken element by element over the a^2 positions of
the transformed tile and summed over input channels. Summed over channels, the a^2 products
are a^2 matrix products, (tiles x C_in) @ (C_in x C_out): per output and channel pair
F(2x2, 3x3) does 16/4 = 4 multiply-adds and F(4x4, 3x3) 36/16 = 2.25, against 9 for the direct
form.

What each costs instead:
- accuracy: F(2x2) only adds, subtracts and halves, so in fp32 it is more accurate than
  oneDNN's direct kernels (about 3e-7 relative L2 against fp64, direct 6.5e-7-1.3e-6).
  F(4x4)'s transforms have coefficients up to 8: about 2e-6.
- memory: a transformed kernel of a^2 / 9 the weight (16/9, 4x), and transformed tiles and
  products of a^2 / m^2 the input and output (4x, 2.25x), made in several memory passes;
  working in bands (BAND_BYTES) keeps those in cache.
Whether a layer uses it, and which m, is measured per layer and machine
(ldm.inference.winograd_plan), and only fp32 inference calls on the CPU take it: bf16 would
round the transformed values, and oneDNN's bf16 convolutions are the faster path on CPUs with
bf16 arithmetic.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ldm.kernels.winograd import G, TILES, winograd_input, winograd_output

# The transformed tiles and their products are larger than the input and output. Worked in
# bands of tile rows whose largest temporary stays under this size, they come from the heap
# (fp32 blocks up to 32 MiB, ldm.runtime.tune_allocator) instead of fresh mappings that
# page-fault on every call, and stay in cache between the passes: at 320 channels and 64x64
# pixels that makes F(2x2) 0.6x of the direct convolution's time instead of 1.0x
# (docs/performance.md).
BAND_BYTES = 16 * 2**20


def transform_weight(weight: Tensor, m: int = 2) -> Tensor:
    """(C_out, C_in, 3, 3) kernel -> the a^2 transformed kernels G g G^T as (a^2, C_in, C_out),
    position (i, j) of the a x a transform at index a i + j, in fp32 (about 3e-8 relative
    against fp64)."""
    if m not in G:
        raise ValueError(f"Winograd tile side {m} is not one of {TILES}")
    g = torch.tensor(G[m], dtype=torch.float64, device=weight.device)
    # G g G^T for every channel pair as one matrix product, (G kron G)[a i + j, 3 k + l] being
    # G[i, k] G[j, l], made straight in the (a^2, C_in, C_out) layout: at SD's sizes an fp64
    # einsum over the four indices took 4-10 s per layer, this under 1 s.
    c_out, c_in = weight.shape[:2]
    taps = weight.detach().float().permute(2, 3, 1, 0).reshape(9, c_in * c_out)
    return (torch.kron(g, g).float() @ taps).view(-1, c_in, c_out)


def tile_side(u: Tensor) -> int:
    """m of a transformed kernel: a^2 = u.shape[0] positions, a = m + 2."""
    return {(m + 2) ** 2: m for m in TILES}[u.shape[0]]


def winograd_conv2d(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias, padding=1) for a 3x3 weight given as transform_weight(weight, m);
    any H and W (sides that are not multiples of m compute padded rows or columns, then crop).
    The output is channels_last, and so is the input best (it is read as N, H, W, C)."""
    n, c, h, w = x.shape
    m = tile_side(u)
    tiles_h, tiles_w = -(-h // m), -(-w // m)
    padded = x.new_empty(n, m * tiles_h + 2, m * tiles_w + 2, c)
    padded[:, 0].zero_()
    padded[:, h + 1:].zero_()  # the bottom pad row, and those of an incomplete tile row
    padded[:, :, 0].zero_()
    padded[:, :, w + 1:].zero_()
    padded[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    row_bytes = u.shape[0] * tiles_w * max(c, u.shape[2]) * x.element_size()
    rows = max(1, BAND_BYTES // row_bytes)
    if rows >= tiles_h:  # whole images per band
        images = rows // tiles_h
        bands = [_band(padded[i:i + images], u, bias, m) for i in range(0, n, images)]
        y = bands[0] if len(bands) == 1 else torch.cat(bands)
    else:
        y = torch.cat([torch.cat([_band(padded[i:i + 1, m * r:m * min(r + rows, tiles_h) + 2],
                                        u, bias, m)
                                  for r in range(0, tiles_h, rows)], dim=1)
                       for i in range(n)])
    if (m * tiles_h, m * tiles_w) != (h, w):
        y = y[:, :h, :w].contiguous()
    return y.permute(0, 3, 1, 2)


def _band(padded: Tensor, u: Tensor, bias: Tensor | None, m: int) -> Tensor:
    """One band of tile rows: padded (N, m T_h + 2, m T_w + 2, C_in) -> (N, m T_h, m T_w,
    C_out), channels innermost: transformed tiles, a^2 matrix products, inverse transform."""
    v = winograd_input(padded, m)
    a, _, n, tiles_h, tiles_w, c = v.shape
    prod = torch.bmm(v.view(a * a, -1, c), u).view(a, a, n, tiles_h, tiles_w, u.shape[2])
    return winograd_output(prod, bias, m)
