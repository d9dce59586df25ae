"""The Stable Diffusion model configs (v1-inference.yaml, v2-inference[-v].yaml) as ModelConfigs.

configs/sd1.yaml, sd2.yaml and sd2-v.yaml mirror these (a test keeps them equal); they are
also what a checkpoint without a config is assumed to be once its family is detected.
"""
from __future__ import annotations

from ldm.config import (AutoencoderConfig, DiffusionConfig, ModelConfig, TextEncoderConfig,
                        UNetConfig)


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


PRESETS = {"sd1": sd1, "sd2": sd2, "sd2-v": lambda: sd2("v")}
