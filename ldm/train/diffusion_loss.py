"""Stage-2 objective: the simple loss on eps/v/x0 targets, Min-SNR weighting, and improved
DDPM's hybrid loss for learned variances.

References: DDPM (Ho et al. 2020) L_simple; improved DDPM (Nichol & Dhariwal 2021) eq. 15-16
and openai/improved-diffusion `training_losses` (vb term with a stop-gradient on the mean;
its per-timestep term added unweighted equals lambda = 1/T in L_simple + lambda L_vlb);
Min-SNR-gamma (Hang et al. 2023) weights min(SNR, gamma)/SNR for eps, /(SNR+1) for v.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.schedule import Schedule
from ldm.prediction import (PredictionType, from_x0_eps, learned_log_variance,
                            parse_prediction_type, split_learned_variance, to_x0_eps)


@dataclass(frozen=True)
class LossTerms:
    """Per-timestep float32 coefficient tables on the training device."""
    a: Tensor                   # sqrt(abar_t)
    s: Tensor                   # sqrt(1 - abar_t)
    snr: Tensor                 # abar_t / (1 - abar_t)
    coef1: Tensor               # posterior mean coefficient of x0
    coef2: Tensor               # posterior mean coefficient of x_t
    post_logvar: Tensor         # log posterior variance, t=0 taken from t=1 (improved DDPM)
    log_betas: Tensor

    @classmethod
    def from_schedule(cls, schedule: Schedule, device: torch.device) -> "LossTerms":
        """Compute in float64, store float32."""
        post_var = schedule.posterior_variance
        post_logvar = torch.cat([post_var[1:2], post_var[1:]]).log()
        acp = schedule.alphas_cumprod
        values = dict(a=acp.sqrt(), s=(1 - acp).sqrt(), snr=acp / (1 - acp),
                      coef1=schedule.posterior_mean_coef1, coef2=schedule.posterior_mean_coef2,
                      post_logvar=post_logvar, log_betas=schedule.betas.log())
        return cls(**{k: v.to(device=device, dtype=torch.float32) for k, v in values.items()})

    def at(self, name: str, t: Tensor) -> Tensor:
        """Table `name` at timesteps t, shaped [B, 1, 1, 1]."""
        return getattr(self, name)[t].view(-1, 1, 1, 1)


def min_snr_weight(snr: Tensor, gamma: float, prediction: PredictionType) -> Tensor:
    """Per-sample loss weight; gamma <= 0 means uniform weights."""
    if gamma <= 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction == PredictionType.EPS:
        return clipped / snr
    if prediction == PredictionType.V:
        return clipped / (snr + 1)
    return clipped


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """-log N(x; mean, e^logvar) elementwise, in nats (continuous: latents are not 8-bit pixels)."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean).pow(2) * torch.exp(-logvar))


def vlb_term(terms: LossTerms, x0: Tensor, x_t: Tensor, t: Tensor, prediction: Tensor,
             var_values: Tensor, prediction_type: PredictionType) -> Tensor:
    """L_t in bits per dimension [B]; the mean comes from the detached prediction so this term
    trains only the variance (improved DDPM sec. 3.1)."""
    a, s = terms.at("a", t), terms.at("s", t)
    x0_hat, _ = to_x0_eps(x_t, prediction.detach(), a, s, prediction_type)
    coef1, coef2 = terms.at("coef1", t), terms.at("coef2", t)
    true_mean = coef1 * x0 + coef2 * x_t
    model_mean = coef1 * x0_hat + coef2 * x_t
    true_logvar = terms.at("post_logvar", t)
    model_logvar = learned_log_variance(var_values, true_logvar, terms.at("log_betas", t))
    kl = normal_kl(true_mean, true_logvar.expand_as(x0), model_mean, model_logvar)
    nll = gaussian_nll(x0, model_mean, model_logvar)
    per_dim = torch.where((t == 0).view(-1, 1, 1, 1), nll, kl)
    return per_dim.mean(dim=(1, 2, 3)) / math.log(2.0)


def diffusion_loss(terms: LossTerms, output: Tensor, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor,
                   prediction_type: str, learned_variance: bool, min_snr_gamma: float,
                   vlb_weight: float, num_timesteps: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss for one batch and its parts (all float32)."""
    kind = parse_prediction_type(prediction_type)
    prediction, var_values = split_learned_variance(output.float(), learned_variance)
    a, s = terms.at("a", t), terms.at("s", t)
    target = from_x0_eps(x0, noise, a, s, kind)
    mse = (prediction - target).pow(2).mean(dim=(1, 2, 3))              # [B]
    weight = min_snr_weight(terms.snr[t], min_snr_gamma, kind)
    loss_simple = (weight * mse).mean()
    logs = {"loss_simple": loss_simple.detach()}
    loss = loss_simple
    if learned_variance:
        vb = vlb_term(terms, x0, x_t, t, prediction, var_values, kind).mean()
        # lambda * L_vlb with L_vlb = T * E_t[L_t]: improved DDPM's hybrid at lambda = 1/T
        loss = loss + vlb_weight * num_timesteps * vb
        logs["loss_vlb"] = vb.detach()
    logs["loss"] = loss.detach()
    return loss, logs
