"""The fused Winograd tile transforms (ldm::winograd_input, ldm::winograd_output) beside their
PyTorch references in ldm.kernels.winograd."""
from __future__ import annotations

import pytest
import torch

from ldm._extension import fused_device_types
from ldm.kernels.winograd import (TILES, winograd_input, winograd_input_reference,
                                  winograd_output, winograd_output_reference)

pytestmark = pytest.mark.skipif("cpu" not in fused_device_types("winograd_input"),
                                reason="ldm._C has no CPU winograd_input")

# (N, T_h, T_w, C): channel counts below, at and above a vector (8 or 16 lanes) and not a
# multiple of it; one tile; SD-sized channels.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 2, 16), (2, 4, 3, 33), (2, 8, 8, 320)]


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_input_transform_matches_reference(m, shape):
    torch.manual_seed(0)
    n, th, tw, c = shape
    padded = torch.randn(n, m * th + 2, m * tw + 2, c)
    got = torch.ops.ldm.winograd_input(padded, m)
    want = winograd_input_reference(padded, m)
    assert got.shape == want.shape == (m + 2, m + 2, n, th, tw, c) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_output_transform_matches_reference(m, shape, with_bias):
    torch.manual_seed(1)
    n, th, tw, c = shape
    prod = torch.randn(m + 2, m + 2, n, th, tw, c)
    bias = torch.randn(c) if with_bias else None
    got = torch.ops.ldm.winograd_output(prod, bias, m)
    want = winograd_output_reference(prod, bias, m)
    assert got.shape == want.shape == (n, m * th, m * tw, c)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_strided_inputs_are_read_as_their_values():
    padded = torch.randn(1, 10, 10, 24)[..., ::2]  # every other channel
    torch.testing.assert_close(torch.ops.ldm.winograd_input(padded, 4),
                               winograd_input_reference(padded.contiguous(), 4))
    prod = torch.randn(4, 4, 1, 2, 3, 10).transpose(3, 4).contiguous().transpose(3, 4)
    torch.testing.assert_close(torch.ops.ldm.winograd_output(prod, None, 2),
                               winograd_output_reference(prod.contiguous(), None, 2))


def test_python_face_takes_the_fused_op_for_fp32_only(monkeypatch):
    torch.manual_seed(2)
    padded, prod = torch.randn(1, 6, 10, 3), torch.randn(4, 4, 1, 2, 4, 3)
    calls = []
    monkeypatch.setattr(torch.ops.ldm, "winograd_input",
                        lambda *a: calls.append("input") or winograd_input_reference(*a))
    monkeypatch.setattr(torch.ops.ldm, "winograd_output",
                        lambda *a: calls.append("output") or winograd_output_reference(*a))
    fp32 = winograd_input(padded, 2), winograd_output(prod, None, 2)
    assert calls == ["input", "output"]
    fp64 = winograd_input(padded.double(), 2), winograd_output(prod.double(), None, 2)
    assert calls == ["input", "output"] and fp64[0].dtype == torch.float64
    for got, want in zip(fp32, fp64):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m", TILES)
def test_opcheck(m):
    torch.library.opcheck(torch.ops.ldm.winograd_input, (torch.randn(2, m * 2 + 2, m + 2, 5), m))
    torch.library.opcheck(torch.ops.ldm.winograd_output,
                          (torch.randn(m + 2, m + 2, 2, 2, 1, 5), torch.randn(5), m))


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.ldm.winograd_input(torch.randn(1, 6, 6, 3), 3), "must be 2 or 4"),
    (lambda: torch.ops.ldm.winograd_input(torch.randn(1, 6, 6, 3).double(), 2), "float32"),
    (lambda: torch.ops.ldm.winograd_input(torch.randn(1, 7, 6, 3), 2), "m \\* tiles \\+ 2"),
    (lambda: torch.ops.ldm.winograd_output(torch.randn(4, 4, 1, 1, 1, 3), None, 4), "a = m \\+ 2"),
    (lambda: torch.ops.ldm.winograd_output(torch.randn(4, 4, 1, 1, 1, 3), torch.randn(4), 2),
     "bias must be float32 \\[C\\]"),
])
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
