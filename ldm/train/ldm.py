"""Stage 2: a text-conditioned U-Net on the frozen VAE's (scaled) latents."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.config import ConfigError, ModelConfig
from ldm.diffusion.schedule import make_schedule, sd_buffers
from ldm.errors import LdmError
from ldm.models.autoencoder import DiagonalGaussian
from ldm.models.unet import TimestepSequential
from ldm.pipeline import Pipeline
from ldm.train.config import LDMTrainConfig
from ldm.train.diffusion_loss import LossTerms, diffusion_loss
from ldm.train.distributed import DistInfo, all_reduce_mean, wrap_ddp
from ldm.train.ema import EMA
from ldm.train.grad_checkpoint import enable_gradient_checkpointing
from ldm.train.loop import OptimGroup, StepContext
from ldm.train.optim import make_optimizer
from ldm.train.report import save_grid

log = logging.getLogger(__name__)


class DiffusionNet(nn.Module):
    """What stage 2 trains: the U-Net and the text encoder (whose weights may be frozen)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        trainable = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            context = self.text_encoder(tokens)
        return self.unet(x_t, t, context)


def model_config_for(config: LDMTrainConfig, autoencoder_config) -> ModelConfig:
    """The trained model's config: the YAML's U-Net/text/diffusion plus the VAE file's autoencoder."""
    model = dataclasses.replace(config.model, autoencoder=autoencoder_config)
    d = model.diffusion
    expected = model.unet.in_channels * (2 if d.learned_variance else 1)
    if model.unet.out_channels != expected:
        raise ConfigError(f"model.unet.out_channels must be {expected} "
                          f"({'2x ' if d.learned_variance else ''}in_channels with "
                          f"learned_variance={d.learned_variance}), got {model.unet.out_channels}")
    if config.data.size % 2 ** (len(autoencoder_config.ch_mult) - 1):
        raise ConfigError(f"data.size {config.data.size} is not a multiple of the VAE's factor")
    return model


class LDMTask:
    """One optimizer over the U-Net (and the text encoder when trainable)."""
    title = "ldm"
    export_name = "model.safetensors"

    def __init__(self, config: LDMTrainConfig, info: DistInfo, cached: bool) -> None:
        self.config, self.info, self.cached = config, info, cached
        device = info.device
        self.autoencoder, ae_config, _ = ckpt.load_autoencoder(config.ldm.vae, device=device)
        self.autoencoder.requires_grad_(False)
        self.model_config = model_config_for(config, ae_config)
        # Seeded, so every rank starts from the same weights; a pretrained text tower
        # (model.text_encoder.weights) is loaded here too.
        fresh = Pipeline.from_config(self.model_config, device=device, seed=config.run.seed)
        self.net = DiffusionNet(fresh.unet, fresh.text_encoder)
        if config.run.gradient_checkpointing:
            # Whole input/middle/output blocks (res blocks with their transformers): one
            # recomputation per block, and only the block inputs are kept.
            enable_gradient_checkpointing(self.net.unet, (TimestepSequential,))
        if config.run.channels_last:
            self.net.unet.to(memory_format=torch.channels_last)
        self.scale_factor = self.model_config.diffusion.scale_factor
        self.schedule = make_schedule(self.model_config.diffusion)
        self.terms = LossTerms.from_schedule(self.schedule, device)
        self._tokens: dict[str, Tensor] = {}
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt, sched = make_optimizer(params, config.optim, config.run.steps)
        # A trainable text tower conditioned on its penultimate layer leaves its last block
        # without gradients, which DDP must then be told to expect.
        text_trainable = any(p.requires_grad for p in self.net.text_encoder.parameters())
        self.ddp = wrap_ddp(self.net, info, find_unused=text_trainable)
        self._groups = [OptimGroup("model", params, opt, sched, config.optim.grad_clip, self.ddp)]

    def modules(self) -> dict[str, nn.Module]:
        """Checkpointed state: the U-Net and text encoder."""
        return {"net": self.net}

    def ema_target(self) -> nn.Module:
        """EMA averages every trainable weight of the U-Net and text encoder."""
        return self.net

    def groups(self) -> list[OptimGroup]:
        """The single optimizer."""
        return self._groups

    def _posterior(self, batch: Tensor, ctx: StepContext) -> DiagonalGaussian:
        if self.cached:
            return DiagonalGaussian(batch.to(ctx.device))
        with torch.no_grad(), ctx.autocast():
            return self.autoencoder.encode(ctx.to_device(batch))

    @torch.no_grad()
    def start(self, batch: tuple[Tensor, list[str]], ctx: StepContext) -> None:
        """scale_by_std: 1 / std of the first (global) batch's latents, as LDM does."""
        if not self.config.ldm.scale_by_std:
            return
        posterior = self._posterior(batch[0], ctx)
        z = ctx.sample_posterior(posterior).float()
        moments = all_reduce_mean(torch.stack([z.mean(), z.pow(2).mean()]), self.info)
        std = (moments[1] - moments[0] ** 2).clamp(min=1e-12).sqrt()
        self.scale_factor = float(1.0 / std)
        log.info("scale_by_std: latent std %.4f -> scale_factor %.5f", float(std), self.scale_factor)

    def micro_step(self, batch: tuple[Tensor, list[str]], step: int, ctx: StepContext) -> dict[str, Tensor]:
        """Noise the latents at random timesteps and regress the configured target."""
        images, captions = batch
        c, d = self.config.ldm, self.model_config.diffusion
        posterior = self._posterior(images, ctx)
        z = ctx.sample_posterior(posterior).float() * self.scale_factor
        if ctx.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        b = z.shape[0]
        drop = ctx.rand_cpu(b) < c.caption_dropout
        captions = ["" if dropped else text for text, dropped in zip(captions, drop.tolist())]
        tokens = self._tokenize(captions).to(ctx.device)
        t = ctx.randint(self.schedule.num_timesteps, b)
        noise = ctx.randn(*z.shape)
        if c.noise_offset:
            # a per-channel constant shift lets the model change overall brightness (noise offset)
            noise = noise + c.noise_offset * ctx.randn(b, z.shape[1], 1, 1)
        x_t = self.terms.at("a", t) * z + self.terms.at("s", t) * noise
        with ctx.autocast():
            output = (self.ddp or self.net)(x_t, t, tokens)
        loss, logs = diffusion_loss(self.terms, output, z, noise, x_t, t, d.prediction_type,
                                    d.learned_variance, c.min_snr_gamma, c.vlb_weight,
                                    self.schedule.num_timesteps)
        ctx.backward(loss, self._groups[0].params)
        return logs

    def _tokenize(self, captions: list[str]) -> Tensor:
        """Token ids [B, L], memoised per caption (BPE + ftfy cost more than a small U-Net step)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        if missing:
            if len(self._tokens) > 200_000:
                self._tokens.clear()
            self._tokens.update(zip(missing, self.net.text_encoder.tokenize(missing)))
        return torch.stack([self._tokens[c] for c in captions])

    def extra_state(self) -> dict[str, Any]:
        """The latent scale factor (fixed by the first batch of the fresh run)."""
        return {"scale_factor": self.scale_factor}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the scale factor so a resumed run uses the original one."""
        self.scale_factor = float(state["scale_factor"])

    def final_config(self) -> ModelConfig:
        """The model config with the measured scale factor inside."""
        diffusion = dataclasses.replace(self.model_config.diffusion, scale_factor=self.scale_factor)
        return dataclasses.replace(self.model_config, diffusion=diffusion)

    def export(self, path: Path, ema: EMA | None) -> None:
        """A full checkpoint (SD layout, config inside) with the EMA weights when EMA is on."""
        def write() -> None:
            tensors = ckpt.collect_state_dict(self.autoencoder, self.net.unet, self.net.text_encoder,
                                              sd_buffers(self.schedule))
            ckpt.write_checkpoint(path, tensors, ckpt.config_metadata(self.final_config()))
        if ema is not None:
            with ema.swapped_in(self.net):
                write()
        else:
            write()

    @torch.no_grad()
    def log_images(self, directory: Path, step: int, ema: EMA | None) -> None:
        """Samples for the fixed prompts with the EMA weights: one row per prompt, fixed seeds."""
        c = self.config.ldm
        if not c.sample_prompts:
            return
        from ldm.inference import SamplingOptions, txt2img
        was_training = self.net.training
        self.net.eval()
        rows = []
        try:
            with ema.swapped_in(self.net) if ema is not None else contextlib.nullcontext():
                pipe = Pipeline(self.autoencoder, self.net.unet, self.net.text_encoder,
                                self.final_config(), device=self.info.device)
                for prompt in c.sample_prompts:
                    options = SamplingOptions(prompt=prompt, height=self.config.data.size,
                                              width=self.config.data.size, steps=c.sample_steps,
                                              guidance_scale=c.guidance_scale, seed=0,
                                              num_images=c.samples_per_prompt)
                    rows += txt2img(pipe, options)
        except LdmError as err:  # a sampling problem must not end a long training run
            log.warning("no sample grid at step %d: %s", step, err)
            return
        finally:
            self.net.train(was_training)
        images = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
                              for im in rows]) / 127.5 - 1.0
        save_grid(images, directory / f"samples_{step:07d}.png", ncols=c.samples_per_prompt)
