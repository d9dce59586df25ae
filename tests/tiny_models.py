"""The tiny random SD-1.x-layout model that several test files build (32x32 images, 16x16 latents)."""
from __future__ import annotations

from ldm.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig


def tiny_config(text_layers: int = 2) -> ModelConfig:
    """A random model small enough for the CPU: VAE factor 2, 2-level U-Net, tiny HF-CLIP text."""
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": text_layers, "num_attention_heads": 2,
            "max_position_embeddings": 77}
    return ModelConfig(
        autoencoder=AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32),
        unet=UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[2], num_heads=2, context_dim=32),
        text_encoder=TextEncoderConfig(kind="hf_clip", arch="tiny", arch_config=text, layer="last"))
