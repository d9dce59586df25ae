"""Stage 1: train the KL autoencoder on images (LDM's AutoencoderKL recipe)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.models.autoencoder import AttnBlock, AutoencoderKL, ResnetBlock
from ldm.train.config import VAETrainConfig
from ldm.train.ema import EMA
from ldm.train.export import averaged_state
from ldm.train.grad_checkpoint import enable_gradient_checkpointing
from ldm.train.loop import OptimGroup, StepContext
from ldm.train.optim import make_optimizer
from ldm.train.report import save_grid
from ldm.train.vae_loss import VAELoss


class VAETask:
    """Autoencoder + learned logvar (one optimizer) and the discriminator (another)."""
    title = "vae"
    export_name = "vae.safetensors"

    def __init__(self, config: VAETrainConfig, device: torch.device, preview: Tensor) -> None:
        self.config = config
        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        self.autoencoder = AutoencoderKL(config.autoencoder).to(device)
        self.loss = VAELoss(config.loss, config.autoencoder.in_channels).to(device)
        if config.run.channels_last:
            self.autoencoder.to(memory_format=torch.channels_last)
            self.loss.to(memory_format=torch.channels_last)
        if config.run.gradient_checkpointing:
            enable_gradient_checkpointing(self.autoencoder, (ResnetBlock, AttnBlock))
        self.preview = preview  # fixed images for the reconstruction grids
        steps, optim = config.run.steps, config.optim
        ae_params = list(self.autoencoder.parameters()) + [self.loss.logvar]
        opt, sched = make_optimizer(ae_params, optim, steps)
        # No DistributedDataParallel here: the adaptive GAN weight takes torch.autograd.grad of
        # the losses at the decoder's last layer, which DDP does not support, and the two
        # optimizers run separate backwards; the loop all-reduces these gradients after them.
        self._groups = [OptimGroup("autoencoder", ae_params, opt, sched, optim.grad_clip)]
        if self.loss.discriminator is not None:
            d_params = list(self.loss.discriminator.parameters())
            opt, sched = make_optimizer(d_params, optim, steps, lr=config.loss.disc_lr or None)
            self._groups.append(OptimGroup("discriminator", d_params, opt, sched, optim.grad_clip))

    def modules(self) -> dict[str, nn.Module]:
        """Checkpointed state: the autoencoder and the loss (logvar, discriminator)."""
        return {"autoencoder": self.autoencoder, "loss": self.loss}

    def ema_target(self) -> nn.Module:
        """EMA averages the autoencoder only."""
        return self.autoencoder

    def groups(self) -> list[OptimGroup]:
        """The autoencoder's optimizer, then the discriminator's (if any)."""
        return self._groups

    def start(self, batch: Any, ctx: StepContext) -> None:
        """Nothing to prepare for stage 1."""

    def micro_step(self, batch: tuple[Tensor, list[str]], step: int, ctx: StepContext) -> dict[str, Tensor]:
        """Generator update terms, then (once active) the discriminator's on the same batch."""
        x = ctx.to_device(batch[0])
        last_layer = self.autoencoder.decoder.conv_out.weight
        with ctx.autocast():
            posterior = self.autoencoder.encode(x)
            recon = self.autoencoder.decode(ctx.sample_posterior(posterior))
            loss, logs = self.loss.generator_loss(x, recon, posterior, step, last_layer)
        ctx.backward(loss, self._groups[0].params)
        if self.loss.disc_active(step):
            with ctx.autocast():
                d_loss, d_logs = self.loss.discriminator_loss(x, recon)
            ctx.backward(d_loss, self._groups[1].params)
            logs.update(d_logs)
        return logs

    def extra_state(self) -> dict[str, Any]:
        """No stage-1 state beyond weights and optimizers."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def export(self, path: Path, ema: EMA | None) -> None:
        """The VAE-only file: first_stage_model.* and {"autoencoder": config} (ldm.checkpoint layout)."""
        state = averaged_state(self.autoencoder, ema)
        tensors = {ckpt.PREFIXES["autoencoder"] + k: v for k, v in state.items()}
        ckpt.write_checkpoint(path, tensors, ckpt.config_metadata(self.config.autoencoder))

    @torch.no_grad()
    def log_images(self, directory: Path, step: int, ema: EMA | None) -> None:
        """Inputs (top row) above their reconstructions (bottom row), with the EMA weights if any."""
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        device = next(self.autoencoder.parameters()).device
        x = self.preview.to(device)
        if ema is not None:
            with ema.swapped_in(self.autoencoder):
                recon = self.autoencoder(x, sample=False)[0]
        else:
            recon = self.autoencoder(x, sample=False)[0]
        self.autoencoder.train(was_training)
        save_grid(torch.cat([x, recon]), directory / f"recon_{step:07d}.png", ncols=x.shape[0])
