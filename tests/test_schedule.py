"""Schedules: SD buffers equal the reference checkpoints', each beta schedule's defining property."""
import dataclasses
import math

import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion.schedule import (SD_BUFFER_NAMES, make_schedule, schedule_from_sd_buffers,
                                    sd_buffers)
from conftest import FIXTURES

REFS = [FIXTURES / "sd2_dev" / "tiny_dev_ref.safetensors",
        FIXTURES / "sd1_dev" / "tiny_sd1_ref.safetensors"]


@pytest.mark.parametrize("ref_path", REFS, ids=["sd2", "sd1"])
def test_sd_buffers_match_reference_checkpoint(ref_path):
    if not ref_path.exists():
        pytest.skip(f"fixture {ref_path} missing")
    from safetensors.torch import load_file
    ref = load_file(str(ref_path))
    ours = sd_buffers(make_schedule(DiffusionConfig(beta_schedule="scaled_linear")))
    assert list(ours) == list(SD_BUFFER_NAMES)
    for name, value in ours.items():
        expected = ref[f"schedule.{name}"]
        assert value.dtype == expected.dtype and value.shape == expected.shape
        assert (value - expected).abs().max() <= 1e-6 * expected.abs().max(), name


def test_linear_and_scaled_linear_endpoints():
    lin = make_schedule(DiffusionConfig(beta_schedule="linear", linear_start=1e-4, linear_end=0.02,
                                        num_timesteps=500))
    assert lin.num_timesteps == 500
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(lin.betas.diff(), lin.betas.diff()[:1].expand(499))  # linear in beta
    scaled = make_schedule(DiffusionConfig(beta_schedule="scaled_linear"))
    root = scaled.betas.sqrt()
    assert torch.allclose(root.diff(), root.diff()[:1].expand(999))  # linear in sqrt(beta)
    assert scaled.betas.dtype == torch.float64


def test_cosine_follows_its_alpha_bar_and_clips():
    s = 0.008
    sched = make_schedule(DiffusionConfig(beta_schedule="cosine", cosine_s=s, num_timesteps=1000))
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sched.betas.max().item() == pytest.approx(0.999)


def test_zero_terminal_snr_rescale():
    base = make_schedule(DiffusionConfig())
    zero = make_schedule(DiffusionConfig(zero_terminal_snr=True))
    assert zero.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert zero.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert (zero.alphas_cumprod.diff() < 0).all()
    assert zero.betas[-1].item() == pytest.approx(1.0)


def test_posterior_matches_bayes_rule_numerically():
    sched = make_schedule(DiffusionConfig())
    t = 300
    abar, abar_prev, beta = (sched.alphas_cumprod[t], sched.alphas_cumprod_prev[t], sched.betas[t])
    # Product of Gaussians: precision of q(x_{t-1}|x_t,x0) = 1/(1-abar_prev) + alpha/beta.
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    assert sched.posterior_variance[t].item() == pytest.approx(1 / precision.item(), rel=1e-10)
    assert sched.posterior_mean_coef1[t].item() == pytest.approx(
        (abar_prev.sqrt() / (1 - abar_prev) / precision).item(), rel=1e-10)
    # x_t's weight: sqrt(alpha) / beta over the same precision, alpha = abar / abar_prev.
    assert (abar / abar_prev).item() == pytest.approx(1 - beta.item(), rel=1e-10)
    assert sched.posterior_mean_coef2[t].item() == pytest.approx(
        ((1 - beta).sqrt() / beta / precision).item(), rel=1e-10)


def test_unknown_schedule_and_frozen():
    with pytest.raises(ValueError, match="cosine"):
        make_schedule(DiffusionConfig(beta_schedule="sigmoid"))
    sched = make_schedule(DiffusionConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.betas = torch.zeros(3)
    rebuilt = schedule_from_sd_buffers(sd_buffers(sched, torch.float64))
    assert torch.equal(rebuilt.alphas_cumprod, sched.alphas_cumprod)
