"""Fused sampler step against its reference: every parameterisation and option, errors."""
from __future__ import annotations

import pytest
import torch

from ldm._extension import fused_device_types
from ldm.kernels import PredictionType, sampler_step, sampler_step_reference, step_coefficients

pytestmark = pytest.mark.skipif("cpu" not in fused_device_types("sampler_step"), reason="ldm._C is not built")

SHAPE = (2, 4, 9, 7)  # odd spatial size: exercises the vector tail


def coeffs_for(seed: int = 0) -> torch.Tensor:
    """Random but well-conditioned step coefficients (a, s away from zero)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(10, generator=g, dtype=torch.float64)
    return step_coefficients(a=0.3 + r[0], s=0.2 + r[1], guidance_scale=1 + 7 * r[2],
                             c_x=r[3] - 0.5, c_x0=r[4], c_eps=r[5], c_noise=r[6], c_prev=r[7] - 0.5,
                             logvar_min=-3 - r[8], logvar_max=-1 + r[9])


def tensors(shape, out_rows, out_channels, dtype=torch.float32, seed=1):
    """x, model_output, noise and prev with the given model-output rows and channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    out = torch.randn(out_rows, out_channels, *shape[2:], generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    prev = torch.randn(shape, generator=g).to(dtype)
    return x, out, noise, prev


@pytest.mark.parametrize("prediction_type", list(PredictionType))
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_matches_reference(prediction_type, guided, with_noise, with_prev, learned_variance):
    batch, channels = SHAPE[:2]
    x, out, noise, prev = tensors(SHAPE, 2 * batch if guided else batch,
                                  2 * channels if learned_variance else channels)
    args = (x, out, coeffs_for(), noise if with_noise else None, prev if with_prev else None,
            prediction_type, learned_variance)
    got = sampler_step(*args)
    want = sampler_step_reference(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    x, out, noise, prev = tensors(SHAPE, 2 * SHAPE[0], SHAPE[1], dtype)
    args = (x, out, coeffs_for(), noise, prev, PredictionType.V, False)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for g, w in zip(sampler_step(*args), sampler_step_reference(*args)):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **tol)


def test_non_contiguous_and_mixed_inputs():
    x, out, noise, _ = tensors((2, 4, 8, 8), 4, 4)
    x_view = x.transpose(2, 3)  # non-contiguous latent
    out_cl = out.transpose(2, 3).to(memory_format=torch.channels_last).to(torch.bfloat16)
    coeffs = coeffs_for().double()  # the Python face moves/casts coefficient vectors
    args = (x_view, out_cl, coeffs, noise.transpose(2, 3), None, PredictionType.EPS, False)
    for g, w in zip(sampler_step(*args), sampler_step_reference(*args)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_coefficient_row_of_a_table():
    # Samplers index one row of a [steps, NUM_COEFFS] table per step.
    table = torch.stack([coeffs_for(s) for s in range(3)])
    x, out, noise, _ = tensors(SHAPE, SHAPE[0], SHAPE[1])
    for i in range(3):
        got = sampler_step(x, out, table[i], noise)
        want = sampler_step_reference(x, out, table[i], noise)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)


def test_bitwise_deterministic():
    x, out, noise, prev = tensors((2, 4, 64, 64), 4, 4)
    first = sampler_step(x, out, coeffs_for(), noise, prev)
    for _ in range(3):
        again = sampler_step(x, out, coeffs_for(), noise, prev)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("learned_variance", [False, True])
def test_opcheck(learned_variance):
    x, out, noise, prev = tensors(SHAPE, 2 * SHAPE[0], SHAPE[1] * (2 if learned_variance else 1))
    torch.library.opcheck(torch.ops.ldm.sampler_step,
                          (x, out, coeffs_for(), noise, prev, 1, learned_variance))
    torch.library.opcheck(torch.ops.ldm.sampler_step, (x, out[:2], coeffs_for(), None, None, 0,
                                                       learned_variance))


@pytest.mark.parametrize("change,message", [
    (dict(out=torch.randn(3, 4, 9, 7)), "model_output must be"),
    (dict(out=torch.randn(2, 4, 9, 8)), "model_output must be"),
    (dict(coeffs=torch.zeros(9)), "coeffs must be"),
    (dict(coeffs=torch.zeros(10, dtype=torch.float64)), "coeffs must be"),
    (dict(noise=torch.randn(2, 4, 9)), "noise must be"),
    (dict(prev=torch.randn(1, 4, 9, 7)), "prev must be"),
    (dict(prediction_type=3), "prediction_type"),
    (dict(x=torch.randn(0, 4, 9, 7), out=torch.randn(0, 4, 9, 7)), "non-empty"),
])
def test_bad_input_raises(change, message):
    x, out, noise, prev = tensors(SHAPE, SHAPE[0], SHAPE[1])
    args = dict(x=x, out=out, coeffs=coeffs_for(), noise=noise, prev=prev, prediction_type=0)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ldm.sampler_step(args["x"], args["out"], args["coeffs"], args["noise"],
                                   args["prev"], args["prediction_type"], False)


@pytest.mark.skipif("cpu" not in fused_device_types("sampler_step"), reason="needs ldm._C")
def test_fused_step_is_not_differentiable():
    # An inference op: its outputs do not join the autograd graph (and no deprecation
    # warning is raised for backpropagating through an op without an autograd kernel).
    import warnings
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = torch.randn(2, 4, 8, 8, requires_grad=True)
    coeffs = step_coefficients(a=0.8, s=0.6, guidance_scale=5.0, c_x0=0.9, c_eps=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_next, x0 = sampler_step(x, out, coeffs)
    assert not x_next.requires_grad and not x0.requires_grad
