"""Fused GroupNorm(+SiLU) against its reference: values, gradients, layouts, dtypes, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm._extension import fused_device_types
from ldm.kernels import group_norm_silu, group_norm_silu_reference

pytestmark = pytest.mark.skipif("cpu" not in fused_device_types("group_norm_silu"),
                                reason="ldm._C is not built")
op = torch.ops.ldm.group_norm_silu if "cpu" in fused_device_types("group_norm_silu") else None

# (shape, num_groups): U-Net-like, 1x1, odd 7x5, one channel per group, batch 1 with one
# group (the split path: fewer slabs than threads), 1D and 3D spatial, and 243 channels
# (channels_last rows of 8 + 4 + 2 + 1 vectors and 3 scalar channels). NCHW with HW a power
# of two up to 256 applies a slab's channels in one run: HW = 16 (one vector per channel),
# 32, 64, and 1x512x16x16 in one group (a 131072-value slab split into two chunks).
# channels_last merges a group's channels in vector lanes from 16 channels per group on: 40
# per group takes two vectors and a tail. channels_last bands (whole groups, 4-8 vectors, at
# most 256 KB over the image): 2x64x8x8 (4 vectors, 32 groups each), 2x80x3x5 (5), 2x192x5x7 in
# 8 groups (6 vectors, 4 groups per band, two bands per image), 1x224x3x5 (7) and 1x256x5x3
# (8, one group per band); the other shapes take the tiles path.
SHAPES = [((2, 64, 8, 8), 32), ((2, 4, 1, 1), 2), ((2, 6, 7, 5), 3), ((2, 8, 4, 4), 8),
          ((1, 32, 16, 16), 1), ((2, 8, 9), 4), ((1, 8, 3, 4, 5), 2), ((1, 243, 6, 5), 27),
          ((2, 16, 4, 8), 4), ((1, 512, 16, 16), 1), ((2, 80, 3, 5), 2), ((2, 192, 5, 7), 8),
          ((1, 224, 3, 5), 2), ((1, 256, 5, 3), 2)]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x with channels innermost in memory (any rank), same values."""
    perm = [0, *range(2, x.dim()), 1]
    inverse = [perm.index(i) for i in range(x.dim())]
    return x.permute(perm).contiguous().permute(inverse)


def make_inputs(shape, dtype, layout, affine=True, seed=0):
    """x (offset, scaled: exercises the mean subtraction), weight and bias, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x = channels_last(x)
    w = (torch.randn(shape[1], generator=g) + 1).to(dtype) if affine else None
    b = torch.randn(shape[1], generator=g).to(dtype) if affine else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b)]


def grads(y, inputs, grad_y):
    """Gradients of (y * grad_y).sum() for the inputs that exist."""
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(y, present, grad_y)


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(shape, groups, dtype, layout):
    x, w, b = make_inputs(shape, dtype, layout)
    y = group_norm_silu(x, groups, w, b, eps=1e-5)
    y_ref = group_norm_silu_reference(x, groups, w, b, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for got, want in zip(grads(y, (x, w, b), grad_y), grads(y_ref, (x, w, b), grad_y)):
        torch.testing.assert_close(got, want, **GRAD_TOL[dtype])


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_options(silu, affine):
    x, w, b = make_inputs((2, 12, 5, 6), torch.float32, "contiguous", affine=affine)
    y = group_norm_silu(x, 4, w, b, eps=1e-6, silu=silu)
    y_ref = group_norm_silu_reference(x, 4, w, b, eps=1e-6, silu=silu)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    grad_y = torch.randn_like(y)
    for got, want in zip(grads(y, (x, w, b), grad_y), grads(y_ref, (x, w, b), grad_y)):
        torch.testing.assert_close(got, want, **GRAD_TOL[torch.float32])


def test_only_weight_requires_grad():
    x, w, b = make_inputs((2, 8, 4, 4), torch.float32, "contiguous")
    x = x.detach()
    (dw,) = torch.autograd.grad(group_norm_silu(x, 4, w, b.detach()).sum(), (w,))
    (dw_ref,) = torch.autograd.grad(group_norm_silu_reference(x, 4, w, b.detach()).sum(), (w,))
    torch.testing.assert_close(dw, dw_ref, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(layout):
    x, w, b = make_inputs((2, 6, 3, 4), torch.float64, layout)
    assert torch.autograd.gradcheck(lambda *a: group_norm_silu(a[0], 3, a[1], a[2]), (x, w, b))


def test_non_contiguous_views():
    base, w, b = make_inputs((2, 16, 10, 12), torch.float32, "contiguous")
    for x in (base[:, :, ::2, 1:], base.transpose(2, 3), base[:, :8]):
        groups = 4
        weight, bias = (w[: x.shape[1]], b[: x.shape[1]])
        y = group_norm_silu(x, groups, weight, bias)
        torch.testing.assert_close(y, group_norm_silu_reference(x, groups, weight, bias),
                                   **TOL[torch.float32])
        (gx,) = torch.autograd.grad(y.sum(), (base,))
        y_ref = group_norm_silu_reference(x, groups, weight, bias)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), (base,))
        torch.testing.assert_close(gx, gx_ref, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("layout,tol", [("contiguous", 1e-3), ("channels_last", 1e-2)])
def test_large_values_are_stable(layout, tol):
    # A large common offset: E[x^2] - E[x]^2 would lose all precision here; Welford/Chan does not.
    # channels_last merges per-lane partial statistics of interleaved channels, which costs
    # about 10x the NCHW error here (6e-3). For scale: PyTorch 2.14's own fp32 channels_last
    # GroupNorm on the CPU is off by 3.6 on this input, and by 1.5e3 at 2x320x32x32.
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2)) + 1e4
    reference = group_norm_silu_reference(x.double(), 2, silu=False).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = group_norm_silu(x, 2, silu=False)
    torch.testing.assert_close(y, reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("scale", [1e3, -1e3])
def test_saturated_silu(scale):
    # |z| up to thousands: exp(-z) overflows for very negative z; silu must give ~0, not NaN.
    x, _, b = make_inputs((1, 16, 8, 8), torch.float32, "contiguous")
    w = torch.full((16,), scale)
    y = group_norm_silu(x, 4, w, b)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, group_norm_silu_reference(x, 4, w, b), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("shape,groups,layout", [((2, 64, 8, 8), 32, "contiguous"),
                                                 ((1, 32, 64, 64), 1, "contiguous"),
                                                 ((2, 64, 8, 8), 32, "channels_last")])
def test_bitwise_deterministic(shape, groups, layout):
    x, w, b = make_inputs(shape, torch.float32, layout)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    def run():
        y = group_norm_silu(x, groups, w, b)
        return (y, *grads(y, (x, w, b), grad_y))

    first = run()
    for _ in range(3):
        for a, b_ in zip(first, run()):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("shape,groups,layout", [((2, 64, 8, 8), 32, "contiguous"),
                                                 ((1, 32, 64, 64), 1, "contiguous"),
                                                 ((2, 64, 40, 40), 32, "channels_last"),
                                                 ((1, 64, 40, 40), 32, "channels_last"),
                                                 ((1, 160, 24, 24), 32, "channels_last")])
def test_bitwise_same_for_any_thread_count(shape, groups, layout):
    # The work split depends on the thread count (slabs split into chunks when there are fewer
    # than threads; channels_last takes whole images per thread when the batch divides among
    # them, else tiles and rows across threads; bands are spread over the threads), but the
    # partial results are merged in a fixed order, so values and gradients must not change.
    # 40x40 rows give several tiles per image (fp32 64-channel bands would exceed 256 KB there);
    # 1x160x24x24 is two 80-channel bands (the tiles path would take two tiles there).
    x, w, b = make_inputs(shape, torch.float32, layout)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = group_norm_silu(x, groups, w, b)
            results.append((y, *grads(y, (x, w, b), grad_y)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, w, b = make_inputs((2, 8, 5, 3), torch.float32, layout)
    torch.library.opcheck(op, (x, 4, w, b, 1e-5, True))
    torch.library.opcheck(op, (x.detach(), 2, None, None, 1e-6, False))
    _, mean, rstd = (t.detach() for t in op(x, 4, w, b, 1e-5, True))
    grad_y = torch.randn_like(x)
    backward = torch.ops.ldm.group_norm_silu_backward
    torch.library.opcheck(backward, (grad_y, x.detach(), mean, rstd, w.detach(), b.detach(), 4,
                                     True, [True, True, True]))
    torch.library.opcheck(backward, (grad_y, x.detach(), mean, rstd, None, b.detach(), 4, True,
                                     [True, False, False]))


@pytest.mark.parametrize("make_args,message", [
    (lambda: (torch.randn(4, 8), 2, None, None), "spatial"),
    (lambda: (torch.randn(1, 6, 4, 4), 4, None, None), "divisible"),
    (lambda: (torch.randn(1, 8, 4, 4), 0, None, None), "divisible"),
    (lambda: (torch.randn(1, 8, 4, 4), 2, torch.ones(4), None), "weight must have shape"),
    (lambda: (torch.randn(1, 8, 4, 4), 2, None, torch.ones(8, 1)), "bias must have shape"),
    (lambda: (torch.randn(1, 8, 4, 4), 2, torch.ones(8, dtype=torch.float64), None), "dtype"),
    (lambda: (torch.randn(1, 8, 4, 4), 2, torch.ones(8, device="meta"), None), "is on meta"),
    (lambda: (torch.randn(0, 8, 4, 4), 2, None, None), "empty"),
    (lambda: (torch.ones(1, 8, 4, 4, dtype=torch.int32), 2, None, None), "floating"),
])
def test_bad_input_raises(make_args, message):
    with pytest.raises(RuntimeError, match=message):
        op(*make_args(), 1e-5, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_saturates_at_extreme_pre_activations(dtype: torch.dtype):
    # Pre-activations far beyond +-88 (where exp overflows or underflows in fp32): the fused
    # SiLU must give z and 0 there, finite gradients, and NaN only where the input is NaN.
    # GroupNorm of zeros is 0, so the bias sets each channel's pre-activation; 16 positions
    # per channel take the vector path.
    z = torch.tensor([-1e30, -1e4, -100.0, -88.5, -20.0, 0.0, 20.0, 88.5, 100.0, 1e4, 1e30,
                      float("nan")]).to(dtype).float()
    bias = z.clone().requires_grad_(True)
    y = group_norm_silu(torch.zeros(1, 12, 16, dtype=dtype), 1, None, bias.to(dtype)).float()
    finite = ~torch.isnan(z)
    expected = F.silu(z)[:, None].expand(12, 16)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    # With AVX-512 the SiLU is -0 below z = -88.7, as F.silu's; without it exp(-z) is capped
    # at e^88, so the SiLU is z / e^88 there: about -6e-9 at z = -1e30.
    torch.testing.assert_close(y[0][finite], expected[finite], rtol=tol, atol=2e-8)
    assert torch.isnan(y[0][~finite]).all()
    y.sum().backward()
    expected_grad = 16 * torch.func.grad(lambda b: F.silu(b).sum())(z)
    assert torch.isfinite(bias.grad[finite]).all()
    torch.testing.assert_close(bias.grad[finite], expected_grad[finite], rtol=tol, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_silu_and_its_gradient_match_float64_across_the_exp_range(layout: str):
    # A dense sweep of pre-activations through every range of the vectorised exp (its table
    # index, the polynomial, the power of two, saturation), 16 positions per channel so all
    # take the vector path. GroupNorm of zeros is 0, so the bias is the pre-activation.
    # Relative bounds where |silu| > 1e-3 (measured: 4.8e-7 for the value, from the rounding of
    # z log2 e); absolute below that.
    z = torch.linspace(-100.0, 100.0, 4099)[:4096]
    bias = z.clone().requires_grad_(True)
    x = torch.zeros(1, 4096, 16)
    if layout == "channels_last":
        x = channels_last(x)
    y = group_norm_silu(x, 1, None, bias)[0]
    z64 = z.double()
    expected = F.silu(z64)[:, None].expand(4096, 16)
    large = expected.abs() > 1e-3
    relative = ((y.double() - expected).abs() / expected.abs())[large]
    assert relative.max().item() < 1e-6
    assert (y.double() - expected)[~large].abs().max().item() < 1e-8
    y.sum().backward()
    sig = torch.sigmoid(z64)
    expected_grad = 16 * sig * (1 + z64 * (1 - sig))
    torch.testing.assert_close(bias.grad.double(), expected_grad, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_output_rounds_like_the_reference(channels_last: bool):
    # bf16 outputs are rounded from the fp32 SiLU (an exact division; a table exp, 6e-7
    # relative): almost every element must round to the reference's bf16 value (0% NCHW and
    # 0.009% channels_last differ on AVX-512; a reciprocal estimate without a Newton step
    # would give 0.3%).
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16, 16).to(torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(64), torch.randn(64)
    y = group_norm_silu(x, 32, w, b).float()
    ref = group_norm_silu_reference(x, 32, w, b).float()
    assert (y != ref).float().mean().item() < 0.002
    torch.testing.assert_close(y, ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine,silu", [(True, True), (False, True), (True, False)])
def test_channels_last_bands_over_many_rows(dtype, affine, silu):
    # channels_last bands (whole groups, at most 256 KB over the image) run Welford down all of
    # an image's 576 rows, keep the backward's sums in registers and its dz in dx (fp32) or in
    # a band-sized fp32 buffer (bf16). At 1x160x24x24 (two 80-channel bands) their bits differ
    # from the tiles path's, which would take two tiles of rows.
    x, w, b = make_inputs((1, 160, 24, 24), dtype, "channels_last", affine=affine)
    y = group_norm_silu(x, 32, w, b, silu=silu)
    y_ref = group_norm_silu_reference(x, 32, w, b, silu=silu)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    for got, want in zip(grads(y, (x, w, b), grad_y), grads(y_ref, (x, w, b), grad_y)):
        torch.testing.assert_close(got, want, **GRAD_TOL[dtype])


@pytest.mark.parametrize(
    "shape,groups,layout",
    [
        ((1, 64, 256, 272), 32, "contiguous"),  # whole slabs per thread, aligned
        ((1, 32, 363, 365), 32, "contiguous"),  # odd HW: most channel starts unaligned
        ((1, 4, 1100, 1000), 1, "contiguous"),  # one slab split into chunks over threads
        ((1, 96, 216, 216), 32, "channels_last"),  # one image: tiles, then rows over threads
        ((2, 128, 128, 136), 32, "channels_last"),  # whole images per thread
        ((1, 100, 210, 210), 20, "channels_last"),  # 400-byte rows: every fourth aligned
    ],
)
def test_fp32_forward_beyond_the_cache(shape, groups, layout):
    # fp32 inputs whose input and output together exceed the L3 (32 MB on an AMD Zen 3 / Zen 4
    # core complex) write the output with non-temporal stores where it is vector-aligned
    # (ordinary stores elsewhere; AVX-512 builds).
    x, w, b = make_inputs(shape, torch.float32, layout)
    assert 2 * x.numel() * 4 > 32 << 20
    with torch.inference_mode():
        y = group_norm_silu(x, groups, w, b)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, group_norm_silu_reference(x, groups, w, b), **TOL[torch.float32])


@pytest.mark.parametrize("shape,groups", [((2, 64, 20, 20), 32), ((1, 32, 13, 11), 8),
                                          ((2, 128, 16, 16), 32)])
def test_bf16_nchw_even_odd_lanes(shape, groups):
    # bf16 NCHW loads 32 values at a time into even and odd lanes for the statistics and for
    # runs with one scale and shift (per channel: HW = 400 and 143 with vector and scalar
    # tails; per 64-value step of a slab: HW = 256), and stores them back in order.
    x, w, b = make_inputs(shape, torch.bfloat16, "contiguous")
    y, mean, rstd = op(x, groups, w, b, 1e-5, True)
    torch.testing.assert_close(y, group_norm_silu_reference(x, groups, w, b), **TOL[torch.bfloat16])
    slabs = x.float().reshape(shape[0], groups, -1)
    torch.testing.assert_close(mean, slabs.mean(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(slabs.var(-1, unbiased=False) + 1e-5),
                               atol=1e-6, rtol=1e-5)


def test_bf16_channels_last_backward_beyond_the_dz_buffer():
    # bf16 channels_last keeps dz in an fp32 buffer of at most 8 MiB (the small shapes above);
    # beyond it pass 2 evaluates the SiLU derivative again. 2.4M values (9.4 MB of fp32 dz)
    # take that path.
    x, w, b = make_inputs((1, 64, 192, 192), torch.bfloat16, "channels_last")
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = grads(group_norm_silu(x, 32, w, b), (x, w, b), grad_y)
    want = grads(group_norm_silu_reference(x, 32, w, b), (x, w, b), grad_y)
    assert got[0].stride() == x.stride()
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("shape,groups", [((2, 64, 8, 8), 32), ((1, 243, 6, 5), 27)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float16_matches_reference(shape, groups, layout):
    # fp16 runs on the CPU too (fp32 lanes, narrowed by vcvtps2ph); its backward keeps dz in
    # an fp32 buffer as bf16's does.
    x, w, b = make_inputs(shape, torch.float16, layout)
    y = group_norm_silu(x, groups, w, b)
    y_ref = group_norm_silu_reference(x, groups, w, b)
    assert y.dtype == torch.float16 and y.stride() == x.stride()
    torch.testing.assert_close(y, y_ref, atol=2e-3, rtol=2e-3)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    for got, want in zip(grads(y, (x, w, b), grad_y), grads(y_ref, (x, w, b), grad_y)):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
