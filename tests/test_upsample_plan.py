"""The measured choice between the folded and the direct upsampling form
(ldm.inference.upsample_plan) and how load_pipeline applies it."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_UNET, perturb, rel_l2

from ldm.inference import setup, upsample_plan, winograd_plan
from ldm.inference.autotune import CACHE_FILE
from ldm.models.prepacked import set_winograd
from ldm.models.unet import UNetModel
from ldm.models.upsample import Upsample


def prepared_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = perturb(UNetModel(TINY_UNET), 0.05)
    return setup.prepare_for_inference(unet, torch.float32, channels_last=True, prepacked=True)


def direct_blocks(net: torch.nn.Module) -> dict[str, frozenset]:
    return {name: m.direct_sides for name, m in net.named_modules()
            if isinstance(m, Upsample) and m.direct_sides}


def test_choose_upsampling_measures_each_block_shape_once_and_remembers(tmp_path,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    unet = prepared_unet()
    call = setup.unet_call(unet, TINY_UNET, torch.float32, 8)
    with torch.inference_mode():
        folded = unet(*inputs())
    measured = []

    def direct_is_faster(block: Upsample, x: torch.Tensor) -> bool:
        measured.append((block.conv.in_channels, *x.shape))
        return True  # a fixed verdict, for the test
    monkeypatch.setattr(upsample_plan, "direct_is_faster", direct_is_faster)
    assert upsample_plan.choose_upsampling(unet, call, "k", autotune=False) == ""
    assert upsample_plan.choose_upsampling(unet, call, "k", device="cuda") == ""
    assert not measured and not direct_blocks(unet)
    plan = upsample_plan.choose_upsampling(unet, call, "k")
    assert len(measured) == len(set(measured)) > 0
    blocks = direct_blocks(unet)
    assert blocks == {"output_blocks.1.2": {(4, 4)}}  # the tiny U-Net's one upsampling block
    assert plan == "output_blocks.1.2@4x4"
    cache = json.loads((tmp_path / "ldm" / CACHE_FILE).read_text())
    assert [v for k, v in cache.items() if k.startswith("upsampling|k|")] == [plan]
    with torch.inference_mode():
        assert rel_l2(unet(*inputs()), folded) < 1e-5
    # Remembered: a fresh network gets the same plan without measuring.
    measured.clear()
    other = prepared_unet()
    assert upsample_plan.choose_upsampling(other, call, "k") == plan and not measured
    assert direct_blocks(other) == blocks


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last),
            torch.tensor([10.0, 900.0]), torch.randn(2, 7, TINY_UNET.context_dim, generator=g))


@pytest.mark.parametrize("ratio, direct", [(0.8, True), (0.9, True), (0.95, False), (1.3, False)])
def test_direct_needs_a_clear_gain(monkeypatch: pytest.MonkeyPatch, ratio: float,
                                   direct: bool) -> None:
    """A few percent faster is not worth the 4x larger upsampled activation."""
    monkeypatch.setattr(upsample_plan, "best_times",
                        lambda candidates: {"folded": 1.0, "direct": ratio})
    up = Upsample(4).requires_grad_(False)
    assert upsample_plan.direct_is_faster(up, torch.randn(1, 4, 3, 3)) is direct


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_is_faster_leaves_the_block_as_it_was(dtype: torch.dtype, monkeypatch) -> None:
    """Timed for real (fp32: the direct form's convolution with its best Winograd tile, here
    forced to F(2x2)); the block keeps its sides and its convolution's tiles."""
    tiles = []
    monkeypatch.setattr(upsample_plan, "winograd_tile",
                        lambda conv, shape, device: tiles.append(tuple(shape)) or 2)
    up = setup.prepare_for_inference(Upsample(8), dtype, channels_last=True, prepacked=True)
    set_winograd(up.conv, lambda conv: {(5, 5): 4})
    up.direct_sides = frozenset({(7, 7)})
    x = torch.randn(2, 8, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    assert upsample_plan.direct_is_faster(up, x) in (True, False)
    assert tiles == ([(2, 8, 6, 6)] if dtype == torch.float32 else [])
    assert up.direct_sides == {(7, 7)} and dict(up.conv.winograd_tiles) == {(5, 5): 4}


def test_load_pipeline_plans_winograd_for_direct_blocks(tmp_path, monkeypatch) -> None:
    """Blocks that take the direct form have their convolution in the Winograd plan, which is
    remembered under a key naming the upsampling plan; images stay the folded ones."""
    import ldm
    from ldm.inference import autotune
    from ldm.pipeline import Pipeline
    from test_inference_setup import tiny_config
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "fastest", lambda candidates, repeats=2: "on")
    monkeypatch.setattr(upsample_plan, "direct_is_faster", lambda block, x: True)
    monkeypatch.setattr(winograd_plan, "winograd_tile", lambda conv, shape, device: 2)
    path = tmp_path / "tiny.safetensors"
    Pipeline.from_config(tiny_config(), seed=1).save(path)
    pipe = ldm.load_pipeline(path, dtype="fp32")
    for net in (pipe.unet, pipe.autoencoder):
        blocks = direct_blocks(net)
        assert blocks
        for name in blocks:
            assert net.get_submodule(f"{name}.conv").winograd_tiles
    cache = json.loads((tmp_path / "cache" / "ldm" / CACHE_FILE).read_text())
    assert sum(k.startswith("winograd|") and " direct upsampling " in k for k in cache) == 2
    folded = ldm.load_pipeline(path, dtype="fp32", autotune=False)
    assert not direct_blocks(folded.unet) and not direct_blocks(folded.autoencoder)
    z = torch.randn(1, pipe.latent_channels, 8, 8)
    with torch.inference_mode():
        assert rel_l2(pipe.decode_latents(z), folded.decode_latents(z)) < 1e-5


def test_plans_of_another_format_are_measured_again() -> None:
    assert upsample_plan._is_plan("") and upsample_plan._is_plan("a.1@4x4;b@8x16")
    assert not upsample_plan._is_plan("a.1@4x4:2")


def test_only_doubling_calls_are_planned() -> None:
    """A block given another target size (the U-Net's odd skips) always takes the direct form,
    so such calls are not timed."""
    up = Upsample(4).requires_grad_(False)
    x = torch.randn(1, 4, 3, 3)
    assert set(upsample_plan.upsample_inputs(up, lambda: up(x, size=(5, 6)))) == set()
    (got,) = upsample_plan.upsample_inputs(up, lambda: up(x, size=(6, 6))).values()
    assert got is x
    (got,) = upsample_plan.upsample_inputs(up, lambda: up(x)).values()
    assert got is x
