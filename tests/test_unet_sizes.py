"""U-Net forward at latent sizes that are not multiples of 2^(levels - 1): output size = input size."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import FIXTURES, ROOT, tiny_config
from ldm.config import UNetConfig, from_dict, parse_yaml
from ldm.models.attention import SpatialTransformer
from ldm.models.layers import timestep_embedding
from ldm.models.unet import ResBlock, UNetModel
from ldm.models.upsample import Upsample
from ldm.presets import sd1, sd2
from ldm.sd_yaml import load_sd_yaml


def shapes_unet() -> UNetConfig:
    """The shipped default model's U-Net (levels [1, 2, 2]: latents were multiples of 4)."""
    data = parse_yaml((ROOT / "configs" / "shapes_ldm.yaml").read_text())
    return from_dict(UNetConfig, data["model"]["unet"])


def fixture_unet(path: str) -> UNetConfig:
    """The U-Net of a reference fixture's SD YAML."""
    file = FIXTURES / path
    if not file.is_file():
        pytest.skip(f"fixture {file} not present")
    return load_sd_yaml(file).unet


# SD 1.x / 2.x at a tiny scale: their four levels (three downsamplings), heads and projections.
CONFIGS = {
    "tiny": lambda: tiny_config().unet,
    "default": shapes_unet,
    "sd1": lambda: dataclasses.replace(sd1().unet, model_channels=32, num_heads=2, context_dim=16),
    "sd2": lambda: dataclasses.replace(sd2().unet, model_channels=32, num_head_channels=16,
                                       context_dim=16),
    "sd1_fixture": lambda: fixture_unet("sd1_dev/tiny_sd1.yaml"),
    "sd2_fixture": lambda: fixture_unet("sd2_dev/tiny_dev.yaml"),
}


def build(name: str) -> UNetModel:
    """A random U-Net of config `name` with every weight non-zero (zero-init convs would hide bugs)."""
    torch.manual_seed(0)
    unet = UNetModel(CONFIGS[name]()).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.05)
    return unet


def inputs(unet: UNetModel, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x, timesteps, context) for a batch of two."""
    g = torch.Generator().manual_seed(1)
    c = unet.config
    x = torch.randn(2, c.in_channels, h, w, generator=g)
    context = torch.randn(2, 5, c.context_dim, generator=g)
    return x, torch.tensor([10, 700]), context


def run_with(unet: UNetModel, x: Tensor, t: Tensor, context: Tensor, upsample) -> Tensor:
    """The U-Net's block loop with `upsample(layer, h, skip_size)` for every Upsample layer."""
    emb = unet.time_embed(timestep_embedding(t, unet.config.model_channels))

    def block(seq: nn.Module, h: Tensor, size: tuple[int, int] | None) -> Tensor:
        for layer in seq:
            if isinstance(layer, Upsample):
                h = upsample(layer, h, size)
            elif isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    skips, h = [], x
    for seq in unet.input_blocks:
        h = block(seq, h, None)
        skips.append(h)
    h = block(unet.middle_block, h, None)
    for seq in unet.output_blocks:
        h = torch.cat([h, skips.pop()], dim=1)
        h = block(seq, h, tuple(skips[-1].shape[-2:]) if skips else None)
    return unet.out(h)


def plain_2x(layer: Upsample, h: Tensor, size: tuple[int, int] | None) -> Tensor:
    """The folded nearest-2x path, whatever the skip size."""
    return layer(h)


def direct(layer: Upsample, h: Tensor, size: tuple[int, int] | None) -> Tensor:
    """diffusers' form: nearest interpolation to the skip's size, then the 3x3 convolution."""
    return layer.conv(F.interpolate(h, size=size, mode="nearest"))


def levels(unet: UNetModel) -> int:
    """Number of downsamplings."""
    return len(unet.config.channel_mult) - 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_odd_latent_sizes_keep_their_size(name: str) -> None:
    unet = build(name)
    factor = 2 ** levels(unet)
    # 25: the default model at --H 100; 18 -> 9 -> 5: an even side that turns odd further down.
    sizes = [(25, 18), (factor + 1, 2 * factor - 1), (1, 3)] if factor > 4 else [(25, 18), (7, 6), (1, 3)]
    for h, w in sizes:
        x, t, context = inputs(unet, h, w)
        with torch.no_grad():
            out = unet(x, t, context)
            ref = run_with(unet, x, t, context, direct)
        assert out.shape == (2, unet.config.out_channels, h, w), (h, w)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name", ["tiny", "default", "sd1", "sd2_fixture"])
def test_sizes_with_whole_levels_are_unchanged(name: str) -> None:
    unet = build(name)
    factor = 2 ** levels(unet)
    for h, w in [(2 * factor, 2 * factor), (factor, 3 * factor)]:
        x, t, context = inputs(unet, h, w)
        with torch.no_grad():
            out = unet(x, t, context)
            plain = run_with(unet, x, t, context, plain_2x)
        assert out.shape == x.shape[:1] + (unet.config.out_channels, h, w)
        assert torch.equal(out, plain), (h, w)


def test_odd_sizes_train() -> None:
    # Gradients flow through the resized upsample (the training path at odd latents).
    unet = build("tiny").train()
    x, t, context = inputs(unet, 9, 7)
    unet(x, t, context).square().mean().backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert unet.input_blocks[0][0].weight.grad.abs().max() > 0
