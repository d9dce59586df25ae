"""Classifier guidance (Dhariwal & Nichol 2021, algorithm 2) as a wrapper with the denoiser's signature.

A noise-aware classifier p(y | x_t) shifts the predicted noise by its gradient (their eq. 14,
from the score relation grad log p_t(x_t) = -eps(x_t) / sqrt(1 - abar_t)):

    eps_hat(x_t) = eps(x_t) - scale * sqrt(1 - abar_t) * grad_x log p(y | x_t)

For v and x0 models the same shift d = scale * sqrt(1 - abar_t) * grad is carried to their
outputs with x_t = a x0 + s eps held fixed (ldm.prediction, VP space: a^2 + s^2 = 1):
eps - d  <=>  x0 + (s / a) d  <=>  v - d / a. A [uncond; cond] output of classifier-free
guidance gets the shift in both halves, so uncond + w (cond - uncond) is shifted by exactly d:
the two guidances add. Every sampler calls the denoiser in VP space x_t = a x0 + s eps; the
sigma (k-diffusion) samplers pass fractional timesteps, whose level is read as they compute it
(log sigma interpolated, ldm.diffusion.timesteps.t_to_sigma), so one wrapper serves them all.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.coefficients import vp_from_sigma
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import Schedule
from ldm.diffusion.timesteps import t_to_sigma
from ldm.prediction import PredictionType, split_learned_variance

GradFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B,C,H,W], t [B]) -> grad_x log p(y | x_t)
ClassifierFn = Callable[[Tensor, Tensor], Mapping[str, Tensor]]  # (x_t, t) -> logits per attribute


def levels(schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """(a, s) [B] float64 on the host: x_t = a x0 + s eps at (possibly fractional) timesteps t."""
    return vp_from_sigma(t_to_sigma(schedule, t.detach().to("cpu")))


def output_shift(d: Tensor, a: Tensor, s: Tensor, prediction_type: PredictionType) -> Tensor:
    """The change of a network output that moves its eps by -d at fixed x_t (module docstring)."""
    if prediction_type == PredictionType.EPS:
        return -d
    if prediction_type == PredictionType.X0:
        return d * (s / a)
    if prediction_type == PredictionType.V:
        return -d / a
    raise ValueError(f"unknown prediction_type {prediction_type}")


def log_prob_grad(classifier: ClassifierFn, labels: Mapping[str, int | Tensor]) -> GradFn:
    """grad_x sum_k log p(y_k | x_t) over the attributes in `labels` (independent heads).

    Runs with autograd even inside torch.inference_mode (the samplers' context): the input is
    cloned into a normal tensor, the classifier in fp32.
    """
    def grad(x: Tensor, t: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().float().requires_grad_(True)
            logits = classifier(x_in, t.detach().clone())
            total = x_in.new_zeros(())
            for name, label in labels.items():
                log_p = F.log_softmax(logits[name].float(), dim=-1)             # [B, K]
                index = torch.as_tensor(label, device=x.device).long().expand(x.shape[0])
                total = total + log_p.gather(1, index[:, None]).sum()
            (g,) = torch.autograd.grad(total, x_in)
        return g.to(x.dtype)
    return grad


def classifier_guidance(denoiser: Denoiser, grad_log_prob: GradFn, schedule: Schedule,
                        scale: float) -> Denoiser:
    """`denoiser` with its eps shifted by -scale * sqrt(1 - abar_t) * grad log p(y | x_t)."""
    if not scale >= 0:
        raise ValueError(f"classifier guidance scale must be >= 0, got {scale}")
    if scale == 0:
        return denoiser
    kind, learned = denoiser.prediction_type, denoiser.learned_variance

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out = denoiser(x, t)
        a, s = (v.to(x.device, torch.float32)[:, None, None, None] for v in levels(schedule, t))
        d = scale * s * grad_log_prob(x, t).float()                         # [B, C, H, W]
        shift = output_shift(d, a, s, kind).to(out.dtype)
        halves = out.shape[0] // x.shape[0]                                 # 2 with CFG's [uncond; cond]
        prediction, variance = split_learned_variance(out, learned)
        prediction = prediction + shift.repeat(halves, 1, 1, 1)
        return prediction if variance is None else torch.cat([prediction, variance], dim=1)

    return Denoiser(guided, kind, learned, denoiser.guidance_scale)
