"""KL autoencoder (LDM's AutoencoderKL); nesting mirrors SD's `first_stage_model` keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config import AutoencoderConfig
from ldm.kernels.attention import flash_attention
from ldm.models.attention import sdpa_needs_upcast
from ldm.models.layers import GroupNormSiLU
from ldm.models.upsample import Upsample

VAE_NORM_EPS = 1e-6  # SD's model.Normalize


def _norm(channels: int, silu: bool = True) -> GroupNormSiLU:
    return GroupNormSiLU(channels, 32, eps=VAE_NORM_EPS, silu=silu)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1 when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        # One activation-sized tensor fewer alive at a time than the nested form (64 MiB per
        # tensor at the 512 px decoder's last level in bf16): conv1's output is released
        # before conv2 runs, and the residual is added into conv2's fresh output (autograd
        # does not need a convolution's output for its backward).
        h = self.conv1(self.norm1(x))
        h = self.norm2(h)
        h = self.conv2(self.dropout(h))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with 1x1-conv q/k/v/proj_out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels, silu=False)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, 1, HW, C] with unit stride along C (free in channels_last): the CPU's flash SDPA
        # needs it, else the math fallback materialises the HW x HW attention matrix.
        q, k, v = (conv(hn).reshape(b, 1, c, h * w).transpose(2, 3).contiguous()
                   for conv in (self.q, self.k, self.v))
        dtype = q.dtype
        if sdpa_needs_upcast(q):
            q, k, v = q.float(), k.float(), v.float()  # softmax in fp32, as SD
        out = flash_attention(q, k, v).to(dtype)  # [B, 1, HW, C]
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """SD's asymmetric downsampling: zero-pad right/bottom by 1, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    """One resolution level: `block`s, optional `attn`s and a resampler (SD key names)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: Tensor) -> Tensor:
        """Each ResnetBlock, followed by its AttnBlock when the level has attention."""
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image [B,3,H,W] -> moments [B, 2*z (or z), H/f, W/f], f = 2^(len(ch_mult)-1)."""

    def __init__(self, c: AutoencoderConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        res, ch_in = c.resolution, c.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            level = _Level()
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(ch_in, c.ch * mult, c.dropout))
                ch_in = c.ch * mult
                if res in c.attn_resolutions:
                    level.attn.append(AttnBlock(ch_in))
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(ch_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(ch_in, c.dropout)
        self.norm_out = _norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(self.norm_out(_run_mid(self.mid, h)))


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> image [B, out_ch, h*f, w*f] (raw, not clamped)."""

    def __init__(self, c: AutoencoderConfig) -> None:
        super().__init__()
        ch_in = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (len(c.ch_mult) - 1)
        self.conv_in = nn.Conv2d(c.z_channels, ch_in, 3, padding=1)
        self.mid = _mid(ch_in, c.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(c.ch_mult))):
            level = _Level()
            for _ in range(c.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch_in, c.ch * c.ch_mult[i], c.dropout))
                ch_in = c.ch * c.ch_mult[i]
                if res in c.attn_resolutions:
                    level.attn.append(AttnBlock(ch_in))
            if i != 0:
                level.upsample = Upsample(ch_in)
                res *= 2
            levels.insert(0, level)  # `up` is indexed by level, highest resolution first
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, c.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2C, h, w]; logvar clamped to [-30, 20]."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample mean + std * noise."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The mean (the deterministic latent)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dims: [B]."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """Encoder + quant_conv -> DiagonalGaussian; post_quant_conv + Decoder back to pixels."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image in [-1, 1] -> posterior over (unscaled) latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> raw image (roughly [-1, 1], not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (for VAE training)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
