"""Cross-attention U-Net; module nesting mirrors SD's openaimodel.UNetModel state-dict keys."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.config import ConfigError, UNetConfig
from ldm.models.attention import SpatialTransformer
from ldm.models.layers import GroupNormSiLU, timestep_embedding, zero_module
from ldm.models.upsample import Upsample

UNET_NORM_EPS = 1e-5  # SD's GroupNorm32 default


class ResBlock(nn.Module):
    """Two norm-SiLU-conv stages with the timestep embedding added in between, plus a skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        # Index 1 of in_layers/out_layers is SD's separate SiLU, fused here into the norm;
        # the Identity keeps the conv at SD's index (in_layers.2, out_layers.3).
        self.in_layers = nn.Sequential(GroupNormSiLU(channels, eps=UNET_NORM_EPS), nn.Identity(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNormSiLU(out_channels, eps=UNET_NORM_EPS), nn.Identity(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        # Added into out_layers' fresh output (not needed by autograd): one tensor fewer.
        return self.out_layers(h).add_(self.skip_connection(x))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (key `op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """A sequence whose members take (x), (x, emb), (x, context) or (x, size) as their kind requires."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor,  # type: ignore[override]
                size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps/v/x0 predictor: forward(x [B,C,H,W], timesteps [B], context [B,L,D], y [B] when
    num_classes is set) -> [B,C',H,W]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        mc = c.model_channels
        if c.num_heads == -1 and c.num_head_channels == -1:
            raise ConfigError("unet: set num_heads or num_head_channels")
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.num_classes is not None:  # class labels (the upscaler's noise level) add to emb
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)
        no_self_attn = c.disable_self_attentions or [False] * len(c.channel_mult)

        def transformer(ch: int, disable_self_attn: bool = False) -> SpatialTransformer:
            if c.num_head_channels == -1:
                heads, dim_head = c.num_heads, ch // c.num_heads
            else:
                heads, dim_head = ch // c.num_head_channels, c.num_head_channels
            return SpatialTransformer(ch, heads, dim_head, c.context_dim, c.transformer_depth,
                                      c.use_linear_in_transformer, c.dropout, disable_self_attn)

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1  # ds: downsampling factor of the current level
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, c.dropout)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, no_self_attn[level]))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(ResBlock(ch, emb_dim, ch, c.dropout),
                                               transformer(ch, c.disable_middle_self_attn),
                                               ResBlock(ch, emb_dim, ch, c.dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, c.dropout)]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, no_self_attn[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        # SD's out = [GroupNorm32, SiLU, conv]; index 1 kept so the conv stays at `out.2`.
        self.out = nn.Sequential(GroupNormSiLU(ch, eps=UNET_NORM_EPS), nn.Identity(),
                                 zero_module(nn.Conv2d(mc, c.out_channels, 3, padding=1)))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor,
                y: Tensor | None = None) -> Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.out[2].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if (y is None) != (self.config.num_classes is None):
            raise ValueError("y (class labels [B]) must be given exactly when unet.num_classes is set")
        if y is not None:  # openaimodel.UNetModel.forward: emb + label_emb(y)
            emb = emb + self.label_emb(y.to(emb.device, torch.long).expand(x.shape[0]))
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # Each upsample goes to the size of the skip it meets next, as diffusers does: an
            # odd side n halves to ceil(n / 2) on the way down, so 2x would overshoot by one.
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, size)
        return self.out(h).to(x.dtype)
