"""The folded (phase-kernel) nearest-2x-upsample + 3x3 convolution against the direct form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.models.upsample import Upsample, phase_kernels, upsample_conv


def direct(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The reference: build the upsampled image, then convolve."""
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 8, 7, 5), (1, 16, 4, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_direct_fp64(shape: tuple[int, ...], channels_last: bool) -> None:
    torch.manual_seed(0)
    up = Upsample(shape[1]).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x, up = x.to(memory_format=torch.channels_last), up.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y, ref = up(x), direct(x, up.conv)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    if channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_direct_low_precision(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(1)
    up = Upsample(32).to(dtype)
    x = torch.randn(2, 32, 9, 11, dtype=dtype)
    with torch.no_grad():
        y, ref = up(x).float(), direct(x, up.conv).float()
    assert ((y - ref).norm() / ref.norm()).item() < tol


def test_gradients_match_direct() -> None:
    torch.manual_seed(2)
    up = Upsample(4).double()
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 4, 10, 6, dtype=torch.float64)
    params = (x, up.conv.weight, up.conv.bias)
    ours = torch.autograd.grad(up(x), params, grad)
    ref = torch.autograd.grad(direct(x, up.conv), params, grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: upsample_conv(t, phase_kernels(up.conv.weight),
                                                            up.conv.bias), (x,))


def test_cached_kernels_follow_weight_updates() -> None:
    torch.manual_seed(3)
    up = Upsample(4).requires_grad_(False)
    x = torch.randn(1, 4, 3, 3)
    before = up(x)
    up.conv.weight.mul_(2.0)  # in place: same storage, new version
    after = up(x)
    torch.testing.assert_close(after, direct(x, up.conv), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    up.double()  # dtype change refolds
    torch.testing.assert_close(up(x.double()), direct(x.double(), up.conv), rtol=1e-12, atol=1e-12)


def test_weights_made_in_inference_mode() -> None:
    # Inference tensors have no version counter: no cache, but in-place updates still count.
    torch.manual_seed(4)
    x = torch.randn(1, 4, 3, 3)
    with torch.inference_mode():
        up = Upsample(4)
        torch.testing.assert_close(up(x), direct(x, up.conv), rtol=1e-5, atol=1e-5)
        up.conv.weight.mul_(2.0)
        torch.testing.assert_close(up(x), direct(x, up.conv), rtol=1e-5, atol=1e-5)


def test_state_dict_is_the_plain_conv() -> None:
    assert set(Upsample(4).state_dict()) == {"conv.weight", "conv.bias"}


@pytest.mark.parametrize("channels_last", [False, True])
def test_target_size(channels_last: bool) -> None:
    # 2x given explicitly is the folded path, bit for bit; other sizes (an odd skip: 2h - 1)
    # are nearest interpolation to that size, then the convolution.
    torch.manual_seed(5)
    up = Upsample(8).double()
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    if channels_last:
        x, up = x.to(memory_format=torch.channels_last), up.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(up(x, (10, 8)), up(x))
        for size in [(9, 8), (10, 7), (9, 7)]:
            ref = up.conv(F.interpolate(x, size=size, mode="nearest"))
            torch.testing.assert_close(up(x, size), ref, rtol=1e-12, atol=1e-12)
            # nearest to 2h - 1 is the 2x image without its last row: rows repeat in pairs
            crop = F.interpolate(x, scale_factor=2.0, mode="nearest")[:, :, :size[0], :size[1]]
            assert torch.equal(F.interpolate(x, size=size, mode="nearest"), crop)


def test_target_size_gradients() -> None:
    torch.manual_seed(6)
    up = Upsample(3).double()
    x = torch.randn(1, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: up(t, (7, 5)), (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_direct_sides_take_the_direct_form(channels_last: bool, monkeypatch) -> None:
    """Blocks told to take the direct form at a side compute it there (and only there),
    equal to the folded form, and let their folded kernels go."""
    import ldm.models.upsample as upsample
    torch.manual_seed(5)
    up = Upsample(8).requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, other = (torch.randn(s).contiguous(memory_format=fmt) for s in ((2, 8, 6, 5), (1, 8, 4, 4)))
    with torch.no_grad():
        folded, folded_other = up(x), up(other)
    assert up._folded is not None
    assert upsample.set_upsampling(up, lambda block: [(6, 5)]) == 1
    assert up.direct_sides == {(6, 5)} and up._folded is None
    folds = []
    monkeypatch.setattr(upsample, "upsample_conv", lambda *a: folds.append(1) or upsample_conv(*a))
    with torch.no_grad():
        got = up(x)
        assert not folds  # the direct form
        got_other = up(other)
        assert folds  # another side: folded
    torch.testing.assert_close(got, folded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_other, folded_other, rtol=0, atol=0)
    assert upsample.set_upsampling(up, lambda block: ()) == 0 and not up.direct_sides
