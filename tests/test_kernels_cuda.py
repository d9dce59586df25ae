"""CUDA kernels against the reference (run wherever a GPU is present; skipped otherwise)."""
from __future__ import annotations

import pytest
import torch

from ldm._extension import fused_device_types
from ldm.kernels import (PredictionType, group_norm_silu, group_norm_silu_reference, sampler_step,
                         sampler_step_reference, step_coefficients)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in fused_device_types("group_norm_silu"),
    reason="needs a CUDA device and ldm._C built with CUDA")]

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def inputs(shape, dtype, channels_last, seed=0):
    """x, weight, bias on the GPU, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 1).to("cuda", dtype)
    if channels_last:
        perm = [0, *range(2, x.dim()), 1]
        x = x.permute(perm).contiguous().permute([perm.index(i) for i in range(x.dim())])
    w = torch.randn(shape[1], generator=g).to("cuda", dtype)
    b = torch.randn(shape[1], generator=g).to("cuda", dtype)
    return [t.requires_grad_() for t in (x, w, b)]


# Small and large N*groups (the split-reduction path), odd sizes (no vector loads), 1D/3D.
@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 16), 32), ((1, 8, 128, 128), 1),
                                          ((2, 6, 7, 5), 3), ((2, 8, 33), 4),
                                          ((1, 8, 3, 4, 5), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_matches_reference(shape, groups, dtype, channels_last):
    x, w, b = inputs(shape, dtype, channels_last)
    y = group_norm_silu(x, groups, w, b)
    y_ref = group_norm_silu_reference(x, groups, w, b)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), grad_y)
    want = torch.autograd.grad(y_ref, (x, w, b), grad_y)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **{k: 4 * v for k, v in TOL[dtype].items()})


def test_group_norm_silu_bitwise_deterministic():
    x, w, b = inputs((1, 32, 256, 256), torch.float32, False)
    grad_y = torch.randn_like(x)

    def run():
        y = group_norm_silu(x, 4, w, b)
        return (y, *torch.autograd.grad(y, (x, w, b), grad_y))

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, c) for a, c in zip(first, run()))


def test_group_norm_silu_opcheck():
    x, w, b = inputs((2, 8, 5, 3), torch.float32, True)
    torch.library.opcheck(torch.ops.ldm.group_norm_silu.default, (x, 4, w, b, 1e-5, True))


@pytest.mark.parametrize("prediction_type", list(PredictionType))
@pytest.mark.parametrize("learned_variance", [False, True])
def test_sampler_step_matches_reference(prediction_type, learned_variance):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).cuda()
    out = torch.randn(4, 8 if learned_variance else 4, 16, 16, generator=g).cuda()
    noise, prev = torch.randn_like(x), torch.randn_like(x)
    coeffs = step_coefficients(a=0.8, s=0.6, guidance_scale=5.0, c_x=0.1, c_x0=0.9, c_eps=0.4,
                               c_noise=0.2, c_prev=-0.3, logvar_min=-4.0, logvar_max=-2.0).cuda()
    args = (x, out, coeffs, noise, prev, prediction_type, learned_variance)
    for got, want in zip(sampler_step(*args), sampler_step_reference(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
