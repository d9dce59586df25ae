"""oneDNN-packed convolution weights (ldm.models.prepacked) against plain convolutions."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET, perturb, rel_l2
from torch import nn

from ldm.inference.setup import choose_prepacked, prepare_for_inference
from ldm.models.prepacked import PrepackedConv2d, available, set_prepacked
from ldm.models.unet import UNetModel
from ldm.models.upsample import Upsample

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch has no oneDNN packed convolutions")

CL = torch.channels_last


def packed(conv: nn.Conv2d) -> nn.Conv2d:
    set_prepacked(conv, True)
    assert type(conv) is PrepackedConv2d
    return conv


@pytest.mark.parametrize("kwargs, shape", [
    (dict(kernel_size=3, padding=1), (2, 8, 16, 16)),
    (dict(kernel_size=3, padding=1, stride=2), (3, 8, 9, 7)),
    (dict(kernel_size=1), (1, 8, 5, 11)),
    (dict(kernel_size=3, padding=2, dilation=2, groups=2), (2, 8, 10, 10)),
    (dict(kernel_size=(3, 1), padding=(1, 0), bias=False), (2, 8, 6, 6)),
])
def test_packed_conv_matches_conv2d(kwargs: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    conv = packed(nn.Conv2d(8, 12, **kwargs))
    x = torch.randn(shape).contiguous(memory_format=CL)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups)
        got = conv(x)
    assert conv.packed_weight.shapes  # the packed path ran
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL)
    assert rel_l2(got, want) < 1e-5


def test_packed_per_input_shape_most_recent_kept() -> None:
    torch.manual_seed(1)
    conv = packed(nn.Conv2d(8, 16, 3, padding=1))
    shapes = [(2, 8, 16, 16), (1, 8, 7, 9), (2, 8, 16, 16), (4, 8, 32, 8)]
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape).contiguous(memory_format=CL)
            assert rel_l2(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
    assert conv.packed_weight.shapes == [shapes[2], shapes[3]]  # (1, 8, 7, 9) evicted


def test_ineligible_calls_take_the_plain_path() -> None:
    torch.manual_seed(2)
    conv = packed(nn.Conv2d(4, 6, 3, padding=1))
    ref = nn.Conv2d(4, 6, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # NCHW input: the output stays NCHW, nothing packed
        y = conv(x)
        assert y.is_contiguous() and not conv.packed_weight.shapes
        assert rel_l2(y, ref(x)) < 1e-6
    # with autograd: the plain convolution, the same gradients
    xg = x.contiguous(memory_format=CL).requires_grad_(True)
    conv(xg).square().sum().backward()
    ref(xg.detach()).square().sum().backward()
    assert not conv.packed_weight.shapes
    assert rel_l2(conv.weight.grad, ref.weight.grad) < 1e-5


def test_in_place_weight_updates_repack() -> None:
    torch.manual_seed(3)
    conv = packed(nn.Conv2d(4, 8, 3, padding=1))
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=CL)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2.0)
        assert rel_l2(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
        conv.load_state_dict({"weight": torch.randn(8, 4, 3, 3), "bias": torch.zeros(8)})
        assert rel_l2(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5


def test_set_prepacked_both_ways_keeps_the_state_dict() -> None:
    unet = UNetModel(TINY_UNET)
    keys = list(unet.state_dict())
    convs = sum(type(m) is nn.Conv2d for m in unet.modules())
    upsamples = sum(isinstance(m, Upsample) for m in unet.modules())
    assert set_prepacked(unet, True) == convs + upsamples
    assert sum(type(m) is PrepackedConv2d for m in unet.modules()) == convs
    assert list(unet.state_dict()) == keys
    assert set_prepacked(unet, False) == convs + upsamples
    assert sum(type(m) is nn.Conv2d for m in unet.modules()) == convs
    assert not any(m.prepacked for m in unet.modules() if isinstance(m, Upsample))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_folded_upsampling_packed(mode) -> None:
    torch.manual_seed(4)
    up = Upsample(8)
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=CL)
    with mode():
        want = up(x)
        set_prepacked(up, True)
        got = up(x)
    assert up.packed_kernels.shapes
    assert got.is_contiguous(memory_format=CL)
    assert rel_l2(got, want) < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
def test_prepared_unet_packed_matches_plain(dtype: torch.dtype, tolerance: float) -> None:
    # bf16: packed where oneDNN has bf16 convolutions, the plain path elsewhere; either way the
    # documented bf16 tolerance of the U-Net against fp32.
    torch.manual_seed(5)
    unet = perturb(UNetModel(TINY_UNET), 0.05)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), \
        torch.randn(2, 7, TINY_UNET.context_dim)
    with torch.inference_mode():
        ref = unet.eval()(x, t, ctx)
    prepare_for_inference(unet, dtype, channels_last=True, prepacked=True)
    with torch.inference_mode():
        got = unet(x.to(dtype), t, ctx.to(dtype))
    if dtype == torch.float32:
        assert any(m.packed_weight.shapes for m in unet.modules()
                   if isinstance(m, PrepackedConv2d))
    assert rel_l2(got.float(), ref) < tolerance
    prepare_for_inference(unet, torch.float32, channels_last=False)
    assert not any(isinstance(m, PrepackedConv2d) for m in unet.modules())


def test_choose_prepacked_measures_once_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    unet = UNetModel(TINY_UNET)
    assert choose_prepacked(unet, TINY_UNET, torch.float32, 8, autotune=False) is False
    choice = choose_prepacked(unet, TINY_UNET, torch.float32, 8)
    cache = json.loads((tmp_path / "ldm" / "autotune.json").read_text())
    keys = [k for k in cache if k.startswith("prepacked|")]
    assert len(keys) == 1 and cache[keys[0]] == ("on" if choice else "off")
    assert choose_prepacked(unet, TINY_UNET, torch.float32, 8) is choice


def test_prepared_vae_packed_matches_plain() -> None:
    from ldm.config import AutoencoderConfig
    from ldm.models.autoencoder import AutoencoderKL
    torch.manual_seed(6)
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1,
                                          attn_resolutions=[8], resolution=16)).eval()
    image, z = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want_z, want_x = vae.encode(image).mean, vae.decode(z)
        prepare_for_inference(vae, channels_last=True, prepacked=True)
        got_z, got_x = vae.encode(image).mean, vae.decode(z)
    assert any(m.packed_weight.shapes for m in vae.modules() if isinstance(m, PrepackedConv2d))
    assert rel_l2(got_z, want_z) < 1e-5 and rel_l2(got_x, want_x) < 1e-5
