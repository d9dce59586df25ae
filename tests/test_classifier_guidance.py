"""Classifier guidance: the gradient, the eps/v/x0 shift, every sampler, the options and the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from ldm.config import DiffusionConfig
from ldm.diffusion.classifier_guidance import (classifier_guidance, levels, log_prob_grad,
                                               output_shift)
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers import sample
from ldm.diffusion.schedule import make_schedule
from ldm.errors import SamplingError
from ldm.models.classifier import ClassifierConfig, LatentClassifier, load_classifier, save_classifier
from ldm.prediction import PredictionType, combine_guidance, to_x0_eps

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "ldm" / "assets" / "shapes_classifier.safetensors"
LABELS = {"color": ("red", "green", "blue"), "shape": ("circle", "square")}


def _schedule():
    return make_schedule(DiffusionConfig())


class GaussianClassifier(torch.nn.Module):
    """p(y | x) for equal-prior classes x ~ N(m_y, sigma^2 I): logits -|x - m_y|^2 / (2 sigma^2)."""

    def __init__(self, means: torch.Tensor, sigma: float) -> None:
        super().__init__()
        self.means, self.sigma = means, sigma                                  # [K, C, H, W]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        diff = x[:, None] - self.means[None]                                   # [B, K, C, H, W]
        return {"y": -(diff ** 2).flatten(2).sum(-1) / (2 * self.sigma ** 2)}

    def closed_form_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad log p(y | x) = (m_y - sum_k p(k | x) m_k) / sigma^2."""
        p = torch.softmax(self.forward(x, torch.zeros(len(x)))["y"], -1)      # [B, K]
        expected = torch.einsum("bk,kchw->bchw", p, self.means)
        return (self.means[y] - expected) / self.sigma ** 2


def test_gradient_matches_the_closed_form_even_in_inference_mode():
    gen = torch.Generator().manual_seed(0)
    clf = GaussianClassifier(torch.randn(3, 2, 4, 4, generator=gen), sigma=1.5)
    x = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64).float()
    y = torch.tensor([0, 1, 2, 1, 0])
    grad = log_prob_grad(clf, {"y": y})
    with torch.inference_mode():
        got = grad(x, torch.full((5,), 10))
    torch.testing.assert_close(got, clf.closed_form_grad(x, y), rtol=1e-5, atol=1e-5)
    # one label for the whole batch broadcasts
    torch.testing.assert_close(log_prob_grad(clf, {"y": 2})(x, torch.zeros(5)),
                               clf.closed_form_grad(x, torch.full((5,), 2)), rtol=1e-5, atol=1e-5)
    # and autograd through the classifier agrees with the closed form (the reference is right)
    x_req = x.clone().requires_grad_(True)
    log_p = torch.log_softmax(clf(x_req, torch.zeros(5))["y"], -1).gather(1, y[:, None]).sum()
    torch.testing.assert_close(torch.autograd.grad(log_p, x_req)[0], clf.closed_form_grad(x, y),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(PredictionType))
@pytest.mark.parametrize("t", [torch.tensor([10, 500]), torch.tensor([37.25, 998.5])])
def test_shift_moves_eps_by_the_scaled_gradient(kind, t):
    """eps_hat = eps - s sqrt(1 - abar_t) grad for every parameterisation, at integer and
    fractional (sigma sampler) timesteps, and with classifier-free guidance's two halves."""
    schedule = _schedule()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    raw = torch.randn(4, 4, 3, 3, generator=gen)                               # [uncond; cond]
    g = torch.randn(2, 4, 3, 3, generator=gen)
    scale, cfg = 3.0, 4.0
    base = Denoiser(lambda x, t: raw, kind, guidance_scale=cfg)
    guided = classifier_guidance(base, lambda x, t: g, schedule, scale)
    assert guided.guidance_scale == cfg and guided.prediction_type == kind
    a, s = (v.float()[:, None, None, None] for v in levels(schedule, t))
    out = guided(x, t)
    _, eps_before = to_x0_eps(x, combine_guidance(raw, cfg), a, s, kind)
    _, eps_after = to_x0_eps(x, combine_guidance(out, cfg), a, s, kind)
    torch.testing.assert_close(eps_after, eps_before - scale * s * g, rtol=1e-4, atol=1e-4)
    if t.dtype == torch.int64:  # integer t: exactly the schedule's alpha_bar
        abar = schedule.alphas_cumprod[t].float()
        torch.testing.assert_close(s.flatten(), (1 - abar).sqrt(), rtol=1e-6, atol=1e-7)


def test_output_shift_rejects_unknown_kinds_and_scale_zero_is_identity():
    base = Denoiser(lambda x, t: x)
    assert classifier_guidance(base, lambda x, t: x, _schedule(), 0.0) is base
    with pytest.raises(ValueError):
        classifier_guidance(base, lambda x, t: x, _schedule(), -1.0)
    with pytest.raises(ValueError):
        output_shift(torch.ones(1), torch.ones(1), torch.ones(1), 7)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "plms"])
def test_every_sampler_is_steered_toward_the_class(sampler):
    """Data x0 ~ N(0, I), so the exact eps of x_t is s x_t; a linear log p(y | x) = w . x pulls
    the final samples along w, and the wrapper sees the timesteps the sampler passes."""
    schedule = _schedule()
    w = torch.zeros(1, 4, 4, 4)
    w[:, 0] = 1.0
    seen = []

    def exact(x, t):
        return levels(schedule, t)[1].float()[:, None, None, None] * x

    def grad(x, t):
        seen.append(t.clone())
        return w.expand_as(x)

    def run(scale):
        denoiser = classifier_guidance(Denoiser(exact), grad, schedule, scale)
        x_T = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            return sample(sampler, denoiser, x_T, schedule, 10,
                          generator=torch.Generator().manual_seed(4))

    plain, steered = run(0.0), run(2.0)
    assert len(seen) >= 10                                       # every network call is guided
    shift = (steered - plain)[:, 0].mean().item()
    assert shift > 0.5, shift                                   # along w ...
    assert (steered - plain)[:, 1:].abs().max().item() < 1e-4  # ... and nowhere else


def test_classifier_file_round_trip_and_labels(tmp_path):
    torch.manual_seed(0)
    model = LatentClassifier(ClassifierConfig(labels=LABELS, model_channels=16, channel_mult=(1, 2)))
    path = tmp_path / "c.safetensors"
    save_classifier(model, path)
    loaded = load_classifier(path)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.5, 900.0])
    for name, logits in model(x, t).items():
        torch.testing.assert_close(loaded(x, t)[name], logits)
    assert loaded.parse_labels("shape=square, color=blue") == {"shape": 1, "color": 2}
    for bad in ["color", "color=pink", "size=big", "color=red,color=blue", ""]:
        with pytest.raises(ValueError, match="attribute=name"):
            loaded.parse_labels(bad)


def test_shipped_classifier_is_small():
    if not ASSET.is_file():
        pytest.skip("no shipped classifier")
    assert ASSET.stat().st_size < 2 * 1024 * 1024
    assert set(load_classifier(ASSET).config.labels) == {"color", "shape", "bg"}


@pytest.mark.parametrize("fields", [dict(classifier_scale=1.0), dict(classifier_labels="color=red"),
                                    dict(classifier="c.safetensors", classifier_labels="color"),
                                    dict(classifier="c.safetensors", classifier_labels="=red"),
                                    dict(classifier="c.safetensors", classifier_scale=-1.0)])
def test_options_reject_bad_classifier_fields(fields):
    from ldm.inference import SamplingOptions
    with pytest.raises(SamplingError):
        SamplingOptions(**fields)


def test_txt2img_with_classifier_guidance_on_a_tiny_model(tmp_path):
    from ldm.inference import SamplingOptions, txt2img
    from ldm.pipeline import Pipeline
    pipe = Pipeline.from_config(tiny_config(), seed=3)
    path = tmp_path / "c.safetensors"
    save_classifier(LatentClassifier(ClassifierConfig(labels=LABELS, model_channels=16,
                                                      channel_mult=(1, 2))), path)
    base = SamplingOptions(prompt="a", steps=3, guidance_scale=2.0, height=16, width=16)
    guided = SamplingOptions(prompt="a", steps=3, guidance_scale=2.0, height=16, width=16,
                             classifier=str(path), classifier_labels="color=red",
                             classifier_scale=50.0)
    plain, steered = txt2img(pipe, base)[0], txt2img(pipe, guided)[0]
    assert plain.size == steered.size and plain.tobytes() != steered.tobytes()
    bad = SamplingOptions(prompt="a", steps=3, height=16, width=16, classifier=str(path),
                          classifier_labels="color=pink", classifier_scale=1.0)
    with pytest.raises(ValueError, match="color=pink"):
        txt2img(pipe, bad)


@pytest.mark.parametrize("flags, message", [
    (["--classifier", "c.safetensors", "--class", "color"], "attribute=name"),
    (["--classifier", "c.safetensors", "--class", "red,shape=circle", "--classifier-scale", "2"],
     "attribute=name"),
    (["--classifier-scale", "2"], "need a classifier"),
    (["--classifier", "c.safetensors", "--class", "color=red", "--classifier-scale", "-1"], ">= 0"),
])
def test_bad_class_strings_are_one_error_line(tmp_path, flags, message):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--prompt", "x",
                          *flags, "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr
