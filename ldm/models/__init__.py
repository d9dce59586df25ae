"""The three networks; `ldm.pipeline.Pipeline` is what holds them together."""
from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.models.text_encoder import HFClipTextEncoder, OpenClipTextEncoder, build_text_encoder
from ldm.models.unet import UNetModel

__all__ = ["AutoencoderKL", "DiagonalGaussian", "UNetModel", "OpenClipTextEncoder",
           "HFClipTextEncoder", "build_text_encoder"]
