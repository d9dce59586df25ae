"""Classifier-free guidance: one batched pass, scale 1 is one conditional pass, rescale, samplers."""
import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.prediction import combine_guidance
from ldm.diffusion.samplers import sample
from ldm.diffusion.schedule import make_schedule
from ldm.prediction import PredictionType

SCHEDULE = make_schedule(DiffusionConfig())


class ToyUNet:
    """A context-dependent function of (x, t) that records its batch sizes."""

    def __init__(self, out_channels=4):
        self.batches = []
        self.out_channels = out_channels

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        shift = context.mean((1, 2)).view(-1, 1, 1, 1)
        out = 0.3 * x + shift + 1e-3 * t.float().view(-1, 1, 1, 1)
        return out.repeat(1, self.out_channels // x.shape[1], 1, 1)


def contexts(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 77, 8, generator=g), torch.randn(batch, 77, 8, generator=g)


def explicit_guided(unet, x, t, c, uc, scale):
    return unet(x, t, uc) + scale * (unet(x, t, c) - unet(x, t, uc))


@pytest.mark.parametrize("name", ["ddim", "plms", "dpmpp_2m", "euler", "ddpm"])
def test_guided_sampling_equals_explicit_combination(name):
    c, uc = contexts()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    # 5 divides the 1000 training steps, so SD's uniform spacing visits exactly 5 timesteps
    noise = torch.randn(5, *x.shape, generator=torch.Generator().manual_seed(2))
    unet = ToyUNet()
    fused = sample(name, classifier_free_guidance(unet, c, uc, 4.0), x, SCHEDULE, 5, noise=noise)
    assert set(unet.batches) == {4}  # one batched forward of [uncond; cond] per evaluation
    from ldm.diffusion.denoiser import Denoiser
    plain = Denoiser(lambda x, t: explicit_guided(ToyUNet(), x, t, c, uc, 4.0))
    ref = sample(name, plain, x, SCHEDULE, 5, noise=noise)
    assert torch.allclose(fused, ref, atol=1e-5, rtol=1e-5)


def test_scale_one_is_a_single_conditional_pass():
    c, uc = contexts()
    unet = ToyUNet()
    denoiser = classifier_free_guidance(unet, c, uc, 1.0)
    x, t = torch.randn(2, 4, 3, 3), torch.tensor([10, 10])
    assert torch.equal(denoiser(x, t), unet(x, t, c)) and unet.batches == [2, 2]
    assert denoiser.guidance_scale == 1.0
    classifier_free_guidance(unet, c, None, 1.0)  # no uncond needed


def test_guidance_rescale_matches_formula_and_keeps_learned_variance():
    g = torch.Generator().manual_seed(3)
    out = torch.randn(4, 8, 5, 5, generator=g)  # [uncond; cond], learned variance channels
    guided = combine_guidance(out, 7.5, 0.7, learned_variance=True)
    u, c = out[:2, :4], out[2:, :4]
    cfg = u + 7.5 * (c - u)
    ratio = c.std((1, 2, 3), keepdim=True) / cfg.std((1, 2, 3), keepdim=True)
    assert torch.allclose(guided[:, :4], 0.7 * cfg * ratio + 0.3 * cfg, atol=1e-6)
    assert torch.equal(guided[:, 4:], out[2:, 4:])
    full = combine_guidance(out[:, :4], 7.5, 1.0)
    assert torch.allclose(full.std((1, 2, 3)), c.std((1, 2, 3)), rtol=1e-5)


def test_rescaled_wrapper_returns_combined_rows_and_bad_values_raise():
    c, uc = contexts()
    denoiser = classifier_free_guidance(ToyUNet(), c, uc, 5.0, guidance_rescale=0.5,
                                        prediction_type=PredictionType.V)
    assert denoiser(torch.randn(2, 4, 3, 3), torch.tensor([5, 5])).shape[0] == 2
    assert denoiser.guidance_scale == 1.0 and denoiser.prediction_type == PredictionType.V
    with pytest.raises(ValueError, match="guidance_scale >= 0"):
        classifier_free_guidance(ToyUNet(), c, uc, -1.0)
    with pytest.raises(ValueError, match="uncond_context"):
        classifier_free_guidance(ToyUNet(), c, None, 3.0)
