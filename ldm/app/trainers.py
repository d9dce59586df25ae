"""Tiny denoisers trained a few steps at a time (the Train page runs them between reruns)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.app.common import threads
from ldm.app.toy import GaussianMixture, ToyMLP, sample_paths, toy_schedule, training_loss
from ldm.config import UNetConfig
from ldm.data.shapes import ShapesDataset
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers import sample as run_sampler
from ldm.models.unet import UNetModel

SHAPES_SIDE = 16
SHAPES_COUNT = 256


class ToyTrainer:
    """The 2-D mixture's MLP, Adam, and the losses so far."""

    def __init__(self, lr: float = 2e-3, batch: int = 256, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):  # initial weights from `seed`, global RNG untouched
            torch.manual_seed(seed)
            self.model = ToyMLP()
        self.data, self.schedule = GaussianMixture(), toy_schedule()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch, self.losses = batch, []

    def step(self, count: int) -> None:
        """`count` optimiser steps."""
        with threads(1):
            for _ in range(count):
                loss = training_loss(self.model, self.data.sample(self.batch, self.generator),
                                     self.schedule, self.generator)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.losses.append(float(loss.detach()))

    def samples(self, n: int = 400, steps: int = 25) -> Tensor:
        """[n, 2] DDIM samples of the current model."""
        with threads(1):
            return sample_paths(self.model, self.schedule, "ddim", steps, n, seed=1)[-1]


class _PixelUNet(nn.Module):
    """The toolkit's U-Net without attention, in pixel space (no text: a fixed empty context)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNetModel(UNetConfig(in_channels=3, out_channels=3, model_channels=32,
                                         channel_mult=[1, 2], num_res_blocks=1,
                                         attention_resolutions=[], num_head_channels=32,
                                         context_dim=8))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t, x.new_zeros(x.shape[0], 1, 8))


class ShapesTrainer:
    """A small pixel-space U-Net on 16x16 shapes images."""

    def __init__(self, lr: float = 2e-3, batch: int = 16, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _PixelUNet()
        self.schedule = toy_schedule()
        data = ShapesDataset(SHAPES_COUNT, seed=seed, size=SHAPES_SIDE)
        self.images = torch.stack([data[i]["image"] for i in range(SHAPES_COUNT)])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch, self.losses = batch, []

    def step(self, count: int) -> None:
        """`count` optimiser steps on random batches of the set."""
        with threads(1):
            for _ in range(count):
                index = torch.randint(0, SHAPES_COUNT, (self.batch,), generator=self.generator)
                loss = training_loss(self.model, self.images[index], self.schedule,
                                     self.generator)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.losses.append(float(loss.detach()))

    def samples(self, n: int = 8, steps: int = 20) -> Tensor:
        """[n, 3, 16, 16] DDIM samples in [-1, 1]."""
        generator = torch.Generator().manual_seed(1)
        x_T = torch.randn(n, 3, SHAPES_SIDE, SHAPES_SIDE, generator=generator)
        with torch.no_grad(), threads(1):
            return run_sampler("ddim", Denoiser(model=self.model), x_T, self.schedule, steps,
                               generator=generator).clamp(-1, 1)


TRAINERS = {"2-D toy (MLP)": ToyTrainer, "Shapes 16x16 (small U-Net)": ShapesTrainer}
