"""ldm: a latent diffusion toolkit (KL VAE, cross-attention U-Net, OpenCLIP text, fused kernels)."""
__version__ = "0.1.0"
