"""Winograd F(m x m, 3x3) convolutions (ldm.models.winograd) against the direct convolution,
the per-layer switch (ldm.models.prepacked) and the measured plan
(ldm.inference.winograd_plan)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET, perturb, rel_l2
from torch import nn

from ldm.inference import setup
from ldm.inference import winograd_plan
from ldm.inference.autotune import CACHE_FILE, remembered
from ldm.models.prepacked import PrepackedConv2d, set_prepacked, set_winograd, winograd_applies
from ldm.models.unet import UNetModel
from ldm.models.winograd import TILES, transform_weight, winograd_conv2d

CL = torch.channels_last


def direct(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The fp64 reference."""
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                    padding=1)


# Relative L2 error against fp64 per tile side (the direct fp32 convolution: about 1e-6).
TOLERANCE = {2: 2e-6, 4: 5e-6}


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape, c_out, bias, channels_last", [
    ((2, 8, 16, 16), 12, True, True),
    ((1, 5, 7, 9), 3, True, True),  # odd sides: one padded tile row and column, cropped
    ((3, 4, 1, 1), 6, False, True),  # one pixel: one tile, three quarters of it padding
    ((2, 16, 6, 10), 16, True, False),  # NCHW input: read through a permuted view
    ((1, 3, 2, 5), 7, False, False),
])
def test_winograd_matches_direct(shape: tuple[int, ...], c_out: int, bias: bool,
                                 channels_last: bool, m: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    x = x.contiguous(memory_format=CL) if channels_last else x
    weight = torch.randn(c_out, shape[1], 3, 3) / (9 * shape[1]) ** 0.5
    b = torch.randn(c_out) if bias else None
    got = winograd_conv2d(x, transform_weight(weight, m), b)
    want = direct(x, weight, b)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.is_contiguous(memory_format=CL)
    assert rel_l2(got, want) < TOLERANCE[m]


@pytest.mark.parametrize("m, band_bytes, shape, bands", [
    (2, 1, (2, 6, 9, 11), 10),  # one tile row per band, odd sides: the last band has the crop
    (2, 16 * 6 * 8 * 4 * 3, (2, 6, 13, 12), 6),  # three tile rows per band, the last shorter
    (2, 16 * 8 * 8 * 4 * 11, (5, 6, 9, 16), 3),  # two whole images per band, the last alone
    (4, 1, (2, 6, 10, 11), 6),  # 4x4 tiles: a partial tile row and column, cropped
    (4, 36 * 3 * 8 * 4 * 2, (1, 6, 21, 9), 3),  # two tile rows per band, the last one alone
])
def test_winograd_in_bands_matches_direct(monkeypatch: pytest.MonkeyPatch, m: int,
                                          band_bytes: int, shape: tuple[int, ...],
                                          bands: int) -> None:
    from ldm.models import winograd
    monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    calls = []
    band = winograd._band
    monkeypatch.setattr(winograd, "_band", lambda *args: calls.append(1) or band(*args))
    torch.manual_seed(2)
    x = torch.randn(shape).contiguous(memory_format=CL)
    weight = torch.randn(8, 6, 3, 3) / 54 ** 0.5
    b = torch.randn(8)
    got = winograd_conv2d(x, transform_weight(weight, m), b)
    assert len(calls) == bands
    assert rel_l2(got, direct(x, weight, b)) < TOLERANCE[m]


def test_winograd_on_a_strided_view() -> None:
    torch.manual_seed(1)
    big = torch.randn(2, 12, 10, 14).contiguous(memory_format=CL)
    x = big[:, 2:10, 1:9, 3:11]  # neither layout contiguous
    weight = torch.randn(5, 8, 3, 3)
    got = winograd_conv2d(x, transform_weight(weight), None)
    assert rel_l2(got, direct(x, weight, None)) < 2e-6


def test_transformed_identity_kernel_copies_the_input() -> None:
    weight = torch.zeros(4, 4, 3, 3)
    weight[range(4), range(4), 1, 1] = 1.0  # centre tap, channel to itself
    x = torch.randn(2, 4, 6, 7).contiguous(memory_format=CL)
    for m in TILES:
        u = transform_weight(weight, m)
        assert u.shape == ((m + 2) ** 2, 4, 4)
        assert torch.allclose(winograd_conv2d(x, u, None), x, atol=1e-6)
    with pytest.raises(ValueError, match="tile side 3"):
        transform_weight(weight, 3)


def test_which_convolutions_it_applies_to() -> None:
    assert winograd_applies(nn.Conv2d(4, 4, 3, padding=1))
    for conv in (nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Conv2d(4, 4, 1),
                 nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                 nn.Conv2d(4, 4, 3, padding=0),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                 nn.Linear(4, 4)):
        assert not winograd_applies(conv)


def winograd_layer(tiles: dict[tuple[int, int], int]) -> nn.Conv2d:
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    assert set_winograd(conv, lambda _: tiles) == 1
    assert type(conv) is PrepackedConv2d
    return conv


def test_layer_takes_winograd_only_for_its_sides_and_fp32_inference(monkeypatch) -> None:
    conv = winograd_layer({(8, 8): 2, (12, 12): 4})
    calls = []
    import ldm.models.prepacked as prepacked
    monkeypatch.setattr(prepacked, "winograd_conv2d",
                        lambda x, u, b: calls.append((x.shape[-1], u.shape[0]))
                        or winograd_conv2d(x, u, b))
    x8, x6, x12 = (torch.randn(2, 6, s, s).contiguous(memory_format=CL) for s in (8, 6, 12))
    with torch.no_grad():
        for x in (x8, x6, x12):
            assert rel_l2(conv(x), direct(x, conv.weight, conv.bias)) < TOLERANCE[4]
        conv(x8.contiguous())  # NCHW: not taken
        conv.bfloat16()(x8.bfloat16())  # bf16: not taken
    assert calls == [(8, 16), (12, 36)]  # each side with its own tile's kernel
    assert set(conv._winograd) == {2, 4}
    conv.float()
    # With gradients the direct convolution runs, and gradients reach the weight.
    conv(x8).sum().backward()
    assert conv.weight.grad is not None and len(calls) == 2
    set_winograd(conv, lambda _: {(8, 8): 4})
    assert set(conv._winograd) == {4}  # the kernel of a tile side no longer used is freed
    with pytest.raises(ValueError, match="tile sides"):
        set_winograd(conv, lambda _: {(8, 8): 3})


def test_transformed_kernel_follows_weight_updates() -> None:
    conv = winograd_layer({(5, 5): 4})
    x = torch.randn(1, 6, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2.0)
        assert rel_l2(conv(x), direct(x, conv.weight, conv.bias)) < TOLERANCE[4]


def test_winograd_and_packing_switch_independently() -> None:
    conv = winograd_layer({(4, 4): 2})
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    set_prepacked(conv, True)
    with torch.no_grad():
        conv(torch.randn(1, 6, 5, 5).contiguous(memory_format=CL))  # direct: packed for 5x5
    assert conv.packed_weight.shapes
    set_winograd(conv, lambda _: {(5, 5): 2})
    assert not conv.packed_weight.shapes  # Winograd's kernel replaces the packed copy
    set_prepacked(conv, False)
    assert type(conv) is PrepackedConv2d and conv.winograd_tiles == {(5, 5): 2}  # Winograd
    assert set_winograd(conv, lambda _: {}) == 0
    assert type(conv) is nn.Conv2d  # neither: the plain module again
    assert conv.state_dict().keys() == state.keys()
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("m", TILES)
def test_winograd_unet_matches_direct(m: int) -> None:
    torch.manual_seed(3)
    unet = perturb(UNetModel(TINY_UNET), 0.05)
    setup.prepare_for_inference(unet, torch.float32, channels_last=True, prepacked=True)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), \
        torch.randn(2, 7, TINY_UNET.context_dim)
    with torch.inference_mode():
        want = unet(x, t, ctx)
        call = lambda: unet(x, t, ctx)  # noqa: E731
        shapes = winograd_plan.conv_inputs(unet, call)
        # (the first layer sees the caller's NCHW input: not recorded, stays direct)
        tiles = lambda conv: {tuple(shapes[conv][-2:]): m} if conv in shapes else {}  # noqa
        assert set_winograd(unet, tiles) == len(shapes) > 4
        got = unet(x, t, ctx)
    assert all(set(conv._winograd) == {m} for conv in shapes)  # every layer ran it
    assert rel_l2(got, want) < 1e-5


def test_choose_winograd_measures_each_layer_shape_once_and_remembers(tmp_path,
                                                                      monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    unet = UNetModel(TINY_UNET)
    setup.prepare_for_inference(unet, torch.float32, channels_last=True, prepacked=True)
    call = setup.unet_call(unet, TINY_UNET, torch.float32, 8)
    measured = []

    def winograd_tile(conv: nn.Module, shape: torch.Size, device: str) -> int | None:
        measured.append((conv.in_channels, conv.out_channels, *shape))
        # a fixed verdict, for the test
        return None if conv.in_channels != conv.out_channels else 4 if shape[-1] == 8 else 2
    monkeypatch.setattr(winograd_plan, "winograd_tile", winograd_tile)
    assert winograd_plan.choose_winograd(unet, call, "k", torch.float32, autotune=False) == 0
    assert not measured
    used = winograd_plan.choose_winograd(unet, call, "k", torch.float32)
    assert len(measured) == len(set(measured)) > 0  # one measurement per distinct shape
    layers = [m for m in unet.modules() if getattr(m, "winograd_tiles", {})]
    assert used == len(layers) > 0 and all(m.in_channels == m.out_channels for m in layers)
    assert {m for conv in layers for m in conv.winograd_tiles.values()} == {2, 4}
    cache = json.loads((tmp_path / "ldm" / CACHE_FILE).read_text())
    (plan,) = [v for k, v in cache.items() if k.startswith("winograd|k|")]
    assert plan.count("@8x8:4") + plan.count("@4x4:2") == used
    # Remembered: a fresh network gets the same plan without measuring.
    measured.clear()
    other = UNetModel(TINY_UNET)
    setup.prepare_for_inference(other, torch.float32, channels_last=True, prepacked=True)
    assert winograd_plan.choose_winograd(other, call, "k", torch.float32) == used and not measured
    # bf16 and autotuning off turn every layer direct.
    assert winograd_plan.choose_winograd(other, call, "k", torch.bfloat16) == 0


def test_winograd_tile_leaves_the_layer_as_it_was() -> None:
    conv = winograd_layer({(3, 3): 4})
    assert winograd_plan.winograd_tile(conv, torch.Size([1, 6, 4, 4]), "cpu") in (None, *TILES)
    assert conv.winograd_tiles == {(3, 3): 4} and set(conv._winograd) == {4}


@pytest.mark.parametrize("f2, f4, chosen", [
    (0.8, 0.7, 2),  # F(4x4) 0.875x of F(2x2): not worth its larger kernel
    (0.8, 0.6, 4),
    (0.9, 0.8, 4),  # F(2x2) alone is no clear gain, F(4x4) is
    (0.9, 0.9, None),
    (1.2, 1.1, None),
])
def test_winograd_needs_a_clear_gain(monkeypatch: pytest.MonkeyPatch, f2: float, f4: float,
                                     chosen: int | None) -> None:
    """A few percent faster is not worth a transformed kernel of 16/9 (4x) the weight."""
    monkeypatch.setattr(winograd_plan, "best_times", lambda candidates: {None: 1.0, 2: f2, 4: f4})
    conv = winograd_layer({(3, 3): 2})
    assert winograd_plan.winograd_tile(conv, torch.Size([1, 6, 4, 4]), "cpu") == chosen


def test_remembered_stores_any_value_and_remeasures_invalid(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runs = []
    measure = lambda: runs.append(1) or "a;b"  # noqa: E731
    assert remembered("plan", "k", measure, default="") == "a;b"
    assert remembered("plan", "k", measure, default="") == "a;b" and len(runs) == 1
    assert remembered("plan", "k", measure, default="", enabled=False) == ""
    assert remembered("plan", "k", measure, default="", valid=lambda v: "c" in v) == "a;b"
    assert len(runs) == 2


def test_load_pipeline_remembers_a_plan_per_network(tmp_path, monkeypatch) -> None:
    import ldm
    from ldm.inference.images import decode
    from ldm.pipeline import Pipeline
    from test_inference_setup import tiny_config
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(winograd_plan, "winograd_tile", lambda conv, shape, device: 2)
    # channels_last measured "on" (NCHW layers never take Winograd), whatever the timing
    from ldm.inference import autotune
    monkeypatch.setattr(autotune, "fastest", lambda candidates, repeats=2: "on")
    path = tmp_path / "tiny.safetensors"
    Pipeline.from_config(tiny_config(), seed=1).save(path)
    pipe = ldm.load_pipeline(path, dtype="fp32")
    cache = json.loads((tmp_path / "cache" / "ldm" / CACHE_FILE).read_text())
    plans = {k.split("|")[1].split()[0]: v for k, v in cache.items() if k.startswith("winograd|")}
    assert set(plans) == {"unet", "decoder"}
    for net, plan in ((pipe.unet, plans["unet"]), (pipe.autoencoder, plans["decoder"])):
        layers = {name for name, m in net.named_modules() if getattr(m, "winograd_tiles", {})}
        assert layers == {entry.split("@")[0] for entry in plan.split(";")} and layers
    # What the pipeline computes stays the direct convolution's result.
    direct = ldm.load_pipeline(path, dtype="fp32", autotune=False)
    z = torch.randn(1, pipe.latent_channels, 8, 8)
    with torch.inference_mode():
        assert rel_l2(pipe.decode_latents(z), direct.decode_latents(z)) < 1e-5
    # Another image size: its own plans, keyed by height x width, in place of the default's.
    f = pipe.downsampling_factor
    default = setup.default_image_size(pipe) // f
    setup.prepare_size(pipe, 4 * f, 6 * f)
    cache = json.loads((tmp_path / "cache" / "ldm" / CACHE_FILE).read_text())
    assert sum(" side 4x6 " in k for k in cache if k.startswith("winograd|")) == 2
    sides = {side for m in pipe.unet.modules() for side in getattr(m, "winograd_tiles", {})}
    assert sides and all(side != (default, default) for side in sides)
    assert (4, 6) in sides and all(h <= 4 and w <= 6 for h, w in sides)
    # Decoded in tiles, the decoder's plan is for the tile's side, the U-Net's for the whole.
    setup.prepare_size(pipe, 8 * f, 12 * f, vae_tile=8)
    cache = json.loads((tmp_path / "cache" / "ldm" / CACHE_FILE).read_text())
    assert {k.split("|")[1].split()[0] for k in cache
            if k.startswith("winograd|") and " side 8x12 " in k} == {"unet"}
    assert any(k.startswith("winograd|decoder") and " side 8 " in k for k in cache)
    decoder_sides = {side for m in pipe.autoencoder.decoder.modules()
                     for side in getattr(m, "winograd_tiles", {})}
    assert (8, 8) in decoder_sides and all(h == w for h, w in decoder_sides)
    z = torch.randn(1, pipe.latent_channels, 8, 12)
    assert rel_l2(decode(pipe, z, 8), decode(direct, z, 8)) < 1e-5
    # Back to the default size: its plans again.
    setup.prepare_size(pipe, default * f, default * f)
    sides = {side for m in pipe.unet.modules() for side in getattr(m, "winograd_tiles", {})}
    assert (default, default) in sides


def test_no_winograd_where_its_kernels_would_crowd_memory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(winograd_plan, "winograd_tile", lambda conv, shape, device: 4)
    unet = UNetModel(TINY_UNET)
    setup.prepare_for_inference(unet, torch.float32, channels_last=True, prepacked=True)
    call = setup.unet_call(unet, TINY_UNET, torch.float32, 8)
    weights = sum(m.weight.nbytes for m in winograd_plan.conv_inputs(unet, call))

    def tiles_with(available: float | None) -> set[int]:
        monkeypatch.setattr(winograd_plan, "available_memory_bytes",
                            lambda: None if available is None else int(available))
        used = winograd_plan.choose_winograd(unet, call, "k", torch.float32)
        tiles = {m for conv in unet.modules() for m in getattr(conv, "winograd_tiles", {}).values()}
        assert used == (len(winograd_plan.conv_inputs(unet, call)) if tiles else 0)
        return tiles
    assert tiles_with(2.1 * 4 * weights) == {4}  # F(4x4) kernels: 4x the weights, under half
    assert tiles_with(1.9 * 4 * weights) == {2}  # over half: F(2x2) kernels (16/9) instead
    assert tiles_with(1.9 * 16 / 9 * weights) == set()  # those over half too: none
    assert tiles_with(None) == {4}  # unknown: the measured plan
    monkeypatch.undo()
    if sys.platform.startswith("linux"):
        assert winograd_plan.available_memory_bytes() > 0


def test_plans_of_another_format_are_measured_again() -> None:
    assert winograd_plan._is_plan("")
    assert winograd_plan._is_plan("input_blocks.1.0.conv@64x64:4;out.2@8x16:2")
    assert not winograd_plan._is_plan("input_blocks.1.0.conv@64x64")  # no tile side: measured
    assert not winograd_plan._is_plan("a@64x64:4;;b@1x2")
