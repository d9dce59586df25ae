"""The x4 upscaler's noise augmentation of its low-res image: q(x_t | x_0) of a separate schedule.

Follows Stability-AI/stablediffusion ldm/modules/diffusionmodules/upscaling.py
(`ImageConcatWithNoiseAugmentation.forward` -> `AbstractLowScaleModel.q_sample`): the low-res
image, in pixel space ([-1, 1], neither encoded nor scaled), is noised to `noise_level`, and the
same level is the U-Net's class label. The module's 8 registered buffers are stored in SD
checkpoints under `low_scale_model.`; `low_scale_buffers` gives them under the same names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.config import DiffusionConfig, NoiseAugmentationConfig
from ldm.diffusion.schedule import Schedule, make_schedule

# Names (and order) of AbstractLowScaleModel.register_schedule's buffers; checkpoint keys rely on them.
LOW_SCALE_BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


@dataclass(frozen=True, eq=False)
class NoiseAugmentation:
    """The augmentation's forward process and the largest level training drew (exclusive)."""
    schedule: Schedule
    max_noise_level: int

    @property
    def num_levels(self) -> int:
        """Number of noise levels the schedule defines (valid levels are 0..num_levels-1)."""
        return self.schedule.num_timesteps


def make_noise_augmentation(config: NoiseAugmentationConfig) -> NoiseAugmentation:
    """The NoiseAugmentation described by `config` (float64 schedule, as the diffusion one)."""
    process = DiffusionConfig(num_timesteps=config.num_timesteps, beta_schedule=config.beta_schedule,
                              linear_start=config.linear_start, linear_end=config.linear_end,
                              cosine_s=config.cosine_s)
    return NoiseAugmentation(schedule=make_schedule(process), max_noise_level=config.max_noise_level)


def noise_low_res(augmentation: NoiseAugmentation, image: Tensor, noise_level: Tensor | int,
                  noise: Tensor) -> Tensor:
    """sqrt(abar_l) image + sqrt(1 - abar_l) noise for image [B,C,h,w] and levels l [B] (or one int)."""
    if noise.shape != image.shape:
        raise ValueError(f"noise {list(noise.shape)} must have the image's shape {list(image.shape)}")
    level = torch.as_tensor(noise_level, dtype=torch.long).reshape(-1).cpu()
    if level.numel() == 1:
        level = level.expand(image.shape[0])
    if level.numel() != image.shape[0]:
        raise ValueError(f"noise_level has {level.numel()} entries for a batch of {image.shape[0]}")
    if level.min() < 0 or level.max() >= augmentation.num_levels:
        raise ValueError(f"noise_level must lie in 0..{augmentation.num_levels - 1}, "
                         f"got {level.tolist()}")
    # The coefficients are rounded to the image's dtype first, as SD's float32 buffers are.
    schedule = augmentation.schedule
    scale = schedule.sqrt_alphas_cumprod[level].to(image.device, image.dtype)[:, None, None, None]
    sigma = schedule.sqrt_one_minus_alphas_cumprod[level].to(image.device, image.dtype)[:, None, None, None]
    return scale * image + sigma * noise.to(image.dtype)


def low_scale_buffers(augmentation: NoiseAugmentation,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The 8 buffers of SD's low_scale_model, computed in float64 and cast to `dtype`."""
    abar = augmentation.schedule.alphas_cumprod
    values = {
        "betas": augmentation.schedule.betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": augmentation.schedule.alphas_cumprod_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / abar - 1),
    }
    return {name: values[name].to(dtype) for name in LOW_SCALE_BUFFER_NAMES}
