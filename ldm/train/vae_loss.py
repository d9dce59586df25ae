"""Stage-1 loss as LDM's LPIPSWithDiscriminator (CompVis/latent-diffusion,
ldm/modules/losses/contperceptual.py): NLL of the reconstruction under a learned scalar
log-variance, a small KL term, optional LPIPS, and a PatchGAN hinge loss switched on at
`disc_start` and weighted adaptively by the ratio of gradient norms at the decoder's last layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.train.config import VAELossConfig
from ldm.train.discriminator import PatchDiscriminator, hinge_d_loss
from ldm.train.lpips import LPIPS


class VAELoss(nn.Module):
    """Holds the trainable loss state: the log-variance and the discriminator."""

    def __init__(self, config: VAELossConfig, image_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        self.logvar = nn.Parameter(torch.full((), float(config.logvar_init)))
        self.discriminator = (PatchDiscriminator(image_channels, config.disc_channels, config.disc_layers)
                              if config.disc_start >= 0 else None)
        # Frozen and not part of the checkpoint: kept out of the module tree on purpose.
        self._lpips = [LPIPS(config.lpips_vgg_path, config.lpips_lin_path)] if config.perceptual_weight > 0 else []

    def disc_active(self, step: int) -> bool:
        """True once the adversarial terms are switched on."""
        return self.discriminator is not None and step >= self.config.disc_start

    def to(self, *args, **kwargs) -> "VAELoss":  # type: ignore[override]
        """Also move the hidden LPIPS network."""
        self._lpips = [m.to(*args, **kwargs) for m in self._lpips]
        return super().to(*args, **kwargs)

    def reconstruction(self, x: Tensor, recon: Tensor) -> Tensor:
        """Per-pixel reconstruction error [B, C, H, W]: L1 (+ L2) (+ LPIPS broadcast)."""
        c = self.config
        diff = (x.float() - recon.float())
        rec = c.l1_weight * diff.abs()
        if c.l2_weight:
            rec = rec + c.l2_weight * diff.pow(2)
        if self._lpips:
            rec = rec + c.perceptual_weight * self._lpips[0](x.float(), recon.float())
        return rec

    def adaptive_weight(self, nll: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """||grad nll|| / ||grad g_loss|| at the decoder's last layer (VQGAN eq. 7), clamped."""
        nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True)
        g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.config.disc_weight

    def generator_loss(self, x: Tensor, recon: Tensor, posterior, step: int,
                       last_layer: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for the autoencoder (+ logvar) and its parts for logging."""
        batch = x.shape[0]
        rec = self.reconstruction(x, recon)
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl = posterior.kl().float().sum() / batch
        loss = nll + self.config.kl_weight * kl
        logs = {"loss_rec": rec.detach().mean(), "loss_nll": nll.detach(), "loss_kl": kl.detach(),
                "logvar": self.logvar.detach()}
        if self.disc_active(step):
            g_loss = -self.discriminator(recon).float().mean()
            d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * self.config.disc_factor * g_loss
            logs.update(loss_g=g_loss.detach(), d_weight=d_weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss of the discriminator on real images vs detached reconstructions."""
        logits_real = self.discriminator(x.detach()).float()
        logits_fake = self.discriminator(recon.detach()).float()
        loss = self.config.disc_factor * hinge_d_loss(logits_real, logits_fake)
        return loss, {"loss_disc": loss.detach(), "logits_real": logits_real.detach().mean(),
                      "logits_fake": logits_fake.detach().mean()}
