"""Winograd F(m x m, 3x3) tile transforms (m = 2 or 4): PyTorch references and fused CPU ops.

The input transform takes every a x a tile of a zero-padded channels-last image (a = m + 2,
tiles m apart) to B^T d B; the output transform takes every a x a tile of products to
A^T P A plus a per-channel bias. ldm/models/winograd.py has the algorithm around them; the
matrices are Lavin and Gray's ("Fast Algorithms for Convolutional Neural Networks", 2016).
The fused ops (csrc/cpu/winograd.cpp) read each tile once and write each result once, where
the references make several passes over strided views.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldm._extension import fused_device_types, has_extension

Matrix = Sequence[Sequence[float]]

# Per output tile side m: B^T (a x a), G (a x 3), A^T (m x a); interpolation points 0, 1, -1
# (and 2, -2 for m = 4) and infinity.
B_T: dict[int, Matrix] = {
    2: ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    4: ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
}
G: dict[int, Matrix] = {
    2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
}
A_T: dict[int, Matrix] = {
    2: ((1, 1, 1, 0), (0, 1, -1, -1)),
    4: ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
}
TILES = tuple(B_T)

# A fact of the build, fixed once ldm._C is loaded.
_FUSED_DEVICES = fused_device_types("winograd_input")


def _combine(matrix: Matrix, d: Sequence[Tensor] | Tensor, out: Tensor) -> None:
    """out[i] = sum_k matrix[i][k] d[k], with out= and in-place ops (no temporaries)."""
    for i, row in enumerate(matrix):
        (k0, c0), (k1, c1), *rest = [(k, c) for k, c in enumerate(row) if c != 0]
        if c0 == 1:
            torch.add(d[k0], d[k1], alpha=c1, out=out[i])
        elif c0 == -1 and c1 == 1:
            torch.sub(d[k1], d[k0], out=out[i])
        else:
            torch.mul(d[k0], c0, out=out[i])
            out[i].add_(d[k1], alpha=c1)
        for k, c in rest:
            out[i].add_(d[k], alpha=c)


def _tiles(padded: Tensor, m: int) -> tuple[int, int]:
    return (padded.shape[1] - 2) // m, (padded.shape[2] - 2) // m


def winograd_input_reference(padded: Tensor, m: int) -> Tensor:
    """padded (N, m T_h + 2, m T_w + 2, C) -> B^T d B of every tile, (a, a, N, T_h, T_w, C):
    B^T over the tile rows, then over the columns of all transformed rows at once."""
    n, _, _, c = padded.shape
    a = m + 2
    tiles_h, tiles_w = _tiles(padded, m)
    d = [padded[:, k:k + m * (tiles_h - 1) + 1:m] for k in range(a)]
    rows = padded.new_empty(a, n, tiles_h, m * tiles_w + 2, c)
    _combine(B_T[m], d, rows)
    d = [rows[:, :, :, k:k + m * (tiles_w - 1) + 1:m] for k in range(a)]
    v = padded.new_empty(a, a, n, tiles_h, tiles_w, c)
    _combine(B_T[m], d, v.transpose(0, 1))
    return v


def winograd_output_reference(prod: Tensor, bias: Tensor | None, m: int) -> Tensor:
    """prod (a, a, N, T_h, T_w, C) -> A^T P A + bias of every tile, as the (N, m T_h, m T_w, C)
    image: A^T over the rows, then over the columns, written straight into the m x m phases."""
    a, _, n, tiles_h, tiles_w, c = prod.shape
    half = prod.new_empty(m, a, n, tiles_h, tiles_w, c)
    _combine(A_T[m], prod, half)
    y = prod.new_empty(n, tiles_h, m, tiles_w, m, c)
    _combine(A_T[m], half.transpose(0, 1), y.permute(4, 2, 0, 1, 3, 5))
    y = y.view(n, m * tiles_h, m * tiles_w, c)
    return y if bias is None else y.add_(bias)


def _fused(t: Tensor) -> bool:
    """Both paths are inference-only (the references write through out=, which autograd
    refuses); the fused ops take fp32 CPU tensors."""
    return t.device.type in _FUSED_DEVICES and t.dtype == torch.float32


def winograd_input(padded: Tensor, m: int) -> Tensor:
    """winograd_input_reference, fused for fp32 CPU tensors when ldm._C is built."""
    if _fused(padded):
        return torch.ops.ldm.winograd_input(padded, m)
    return winograd_input_reference(padded, m)


def winograd_output(prod: Tensor, bias: Tensor | None, m: int) -> Tensor:
    """winograd_output_reference, fused for fp32 CPU tensors when ldm._C is built."""
    if _fused(prod):
        return torch.ops.ldm.winograd_output(prod, bias, m)
    return winograd_output_reference(prod, bias, m)


def _fake_input(padded: Tensor, m: int) -> Tensor:
    n, _, _, c = padded.shape
    tiles_h, tiles_w = _tiles(padded, m)
    return padded.new_empty(m + 2, m + 2, n, tiles_h, tiles_w, c)


def _fake_output(prod: Tensor, bias: Tensor | None, m: int) -> Tensor:
    _, _, n, tiles_h, tiles_w, c = prod.shape
    return prod.new_empty(n, m * tiles_h, m * tiles_w, c)


if has_extension():
    torch.library.register_fake("ldm::winograd_input")(_fake_input)
    torch.library.register_fake("ldm::winograd_output")(_fake_output)
