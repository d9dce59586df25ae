"""The Stable Diffusion model configs as ModelConfigs: v1-inference.yaml, v2-inference[-v].yaml,
v2-inpainting-inference.yaml and x4-upscaling.yaml.

configs/<name>.yaml mirror these (a test keeps them equal); they are also what a checkpoint
without a config is assumed to be once its family and conditioning are detected.
"""
from __future__ import annotations

from ldm.config import (AutoencoderConfig, DiffusionConfig, ModelConfig, NoiseAugmentationConfig,
                        TextEncoderConfig, UNetConfig)


def sd_autoencoder() -> AutoencoderConfig:
    """SD's KL-f8 VAE (83.65M parameters)."""
    return AutoencoderConfig(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                             z_channels=4, embed_dim=4, resolution=256)


def sd1() -> ModelConfig:
    """SD 1.x: 8 heads, conv proj, CLIP ViT-L/14 text (last layer), eps prediction."""
    return ModelConfig(
        autoencoder=sd_autoencoder(),
        unet=UNetConfig(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                        attention_resolutions=[4, 2, 1], num_heads=8, num_head_channels=-1,
                        context_dim=768, use_linear_in_transformer=False),
        text_encoder=TextEncoderConfig(kind="hf_clip", arch="openai/clip-vit-large-patch14",
                                       layer="last"),
        diffusion=DiffusionConfig(prediction_type="eps"))


def sd2(prediction_type: str = "eps") -> ModelConfig:
    """SD 2.x: 64 channels per head, linear proj, OpenCLIP ViT-H/14 text (penultimate layer)."""
    return ModelConfig(
        autoencoder=sd_autoencoder(),
        unet=UNetConfig(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                        attention_resolutions=[4, 2, 1], num_heads=-1, num_head_channels=64,
                        context_dim=1024, use_linear_in_transformer=True),
        text_encoder=TextEncoderConfig(kind="open_clip", arch="ViT-H-14", layer="penultimate"),
        diffusion=DiffusionConfig(prediction_type=prediction_type))


def sd2_inpainting() -> ModelConfig:
    """SD 2 inpainting: SD 2.x base (eps) whose U-Net also takes the mask and masked-image latent."""
    config = sd2("eps")
    config.unet.in_channels = 4 + 1 + 4
    config.conditioning = "inpaint"
    return config


def x4_upscaler() -> ModelConfig:
    """SD x4 upscaler: f=4 VAE (scale 0.08333), 256-channel U-Net on [latent, noisy low-res RGB]
    with the noise level as class label, v prediction on SD's "linear" 1e-4..2e-2 schedule."""
    return ModelConfig(
        autoencoder=AutoencoderConfig(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[],
                                      z_channels=4, embed_dim=4, resolution=256),
        unet=UNetConfig(in_channels=4 + 3, model_channels=256, channel_mult=[1, 2, 2, 4],
                        num_res_blocks=2, attention_resolutions=[2, 4, 8], num_heads=8,
                        num_head_channels=-1, context_dim=1024, use_linear_in_transformer=True,
                        num_classes=1000, disable_self_attentions=[True, True, True, False]),
        text_encoder=TextEncoderConfig(kind="open_clip", arch="ViT-H-14", layer="penultimate"),
        diffusion=DiffusionConfig(beta_schedule="scaled_linear", linear_start=1e-4, linear_end=2e-2,
                                  prediction_type="v", scale_factor=0.08333),
        conditioning="upscale",
        noise_augmentation=NoiseAugmentationConfig(beta_schedule="scaled_linear", linear_start=1e-4,
                                                   linear_end=2e-2, max_noise_level=350))


PRESETS = {"sd1": sd1, "sd2": sd2, "sd2-v": lambda: sd2("v"), "sd2-inpainting": sd2_inpainting,
           "x4-upscaler": x4_upscaler}
