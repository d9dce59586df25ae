"""Inpainting and outpainting: masks, latent blending, keep-unmasked, the script and its errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from conftest import FIXTURES, load_script, tiny_pipeline
from ldm.errors import SamplingError
from ldm.inference import SamplingOptions, inpaint, outpaint
from ldm.inference.inpaint import blend_hook
from ldm.inference.masks import binarise, latent_mask, mask_tensor, pad_canvas


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("model")
    pipe.save(folder / "tiny.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask, "L").save(folder / "mask.png")
    loaded = ldm.load_pipeline(folder / "tiny.safetensors", dtype=torch.float32, autotune=False)
    return loaded, folder


def test_mask_dilate_feather_threshold_and_latent_grid():
    mask = np.zeros((16, 16), np.uint8)
    mask[6:10, 6:10] = 255
    mask[0, 0] = 127  # below half: kept by the inpainting model's binarisation
    mask[0, 15] = 128
    plain = mask_tensor(Image.fromarray(mask, "L"))
    assert binarise(plain)[0, 0, 0, 0] == 0 and binarise(plain)[0, 0, 0, 15] == 1
    grown = mask_tensor(Image.fromarray(mask, "L"), dilate=2)
    assert grown[0, 0, 4:12, 4:12].min() == 1 and grown[0, 0, 3, 3] < 1
    wide = np.zeros((16, 16), np.uint8)
    wide[2:14, 2:14] = 255
    soft = mask_tensor(Image.fromarray(wide, "L"), feather=2)
    assert 0 < soft[0, 0, 1, 8] < 0.5 < soft[0, 0, 3, 8] < 1 and soft[0, 0, 8, 8] > 0.99
    small = latent_mask(plain, 4)  # a latent pixel is repainted if any of its pixels is
    assert small.shape == (1, 1, 4, 4) and small[0, 0, 1:3, 1:3].min() == 1
    assert small[0, 0, 0, 0] == 127 / 255 and small[0, 0, 3, 3] == 0


def test_blend_hook_holds_the_known_region_at_each_level():
    g = torch.Generator().manual_seed(0)
    original, x = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    noise = torch.randn(2, 1, 4, 4, 4, generator=g)
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    levels = (torch.tensor([0.6, 0.8, 1.0], dtype=torch.float64), torch.tensor([0.8, 0.6, 0.0], dtype=torch.float64))
    hook = blend_hook(original, keep, levels, noise)
    first, last = hook(0, x), hook(2, x)
    assert torch.allclose(first[..., :2], (0.6 * original + 0.8 * noise[0])[..., :2])
    assert torch.equal(first[..., 2:], x[..., 2:]) and torch.equal(last[..., :2], original[..., :2])
    with pytest.raises(SamplingError, match="blend noise"):
        blend_hook(original, keep, levels, noise[:1])


def test_keep_unmasked_pastes_the_original_exactly(tiny):
    pipe, folder = tiny
    image, mask = Image.open(folder / "image.png"), Image.open(folder / "mask.png")
    options = SamplingOptions(prompt="a red circle", steps=4, guidance_scale=2.0, keep_unmasked=True,
                              num_images=2, seed=1)
    results = inpaint(pipe, options, image, mask)
    source, hole = np.asarray(image), np.asarray(mask) > 0
    for result in results:
        result = np.asarray(result)
        assert np.array_equal(result[~hole], source[~hole]) and not np.array_equal(result[hole], source[hole])
    with pytest.raises(SamplingError, match="mask size 16x16 differs from the image size 32x32"):
        inpaint(pipe, options, image, mask.resize((16, 16)))


def test_from_the_original_with_strength_and_outpainting(tiny):
    pipe, folder = tiny
    image = Image.open(folder / "image.png")
    options = SamplingOptions(prompt="a red circle", steps=4, guidance_scale=2.0, strength=0.5)
    seen = []
    (result,) = inpaint(pipe, options, image, Image.open(folder / "mask.png"),
                        callback=lambda i, x, d: seen.append(i))
    assert result.size == (32, 32) and seen == [0, 1]
    canvas, mask = pad_canvas(image, 2, 4, 6, 0)
    assert canvas.size == (38, 38) and np.asarray(mask)[6:, 2:34].max() == 0
    assert np.asarray(mask)[:6].min() == 255
    (grown,) = outpaint(pipe, SamplingOptions(prompt="x", steps=3), image, left=2, right=4, top=6)
    assert grown.size == (38, 38)
    with pytest.raises(SamplingError, match="positive padding"):
        outpaint(pipe, SamplingOptions(prompt="x", steps=3), image)


def run(script, folder, tmp_path, capsys, *extra):
    argv = ["--ckpt", folder / "tiny.safetensors", "--outdir", tmp_path / "out", "--steps", 3,
            "--no-autotune", "--prompt", "a red circle", *extra]
    code = script.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_script_inpaints_outpaints_and_regenerates(tiny, tmp_path, capsys):
    _, folder = tiny
    script = load_script("inpaint")
    code, out = run(script, folder, tmp_path, capsys, "--image", folder / "image.png", "--mask",
                    folder / "mask.png", "--mask-dilate", 1, "--mask-feather", 1, "--keep-unmasked")
    assert code == 0, out.err
    made = tmp_path / "out" / "samples" / "00000.png"
    with Image.open(made) as image:
        params = json.loads(image.text["parameters"])
    assert params["task"] == "inpaint" and params["mask_dilate"] == 1 and params["keep_unmasked"]
    assert set(params["inputs"]) == {"image", "mask"}
    assert script.main(["--from-png", str(made), "--outdir", str(tmp_path / "re"), "--no-autotune"]) == 0
    (again,) = (tmp_path / "re" / "samples").glob("*.png")
    with Image.open(again) as a, Image.open(made) as b:
        assert a.tobytes() == b.tobytes()
    code, out = run(script, folder, tmp_path / "pad", capsys, "--image", folder / "image.png",
                    "--pad-left", 4, "--pad-bottom", 2)
    assert code == 0, out.err
    with Image.open(tmp_path / "pad" / "out" / "samples" / "00000.png") as image:
        assert image.size == (36, 34)


def test_script_bad_input_exits_2_without_files(tiny, tmp_path, capsys):
    _, folder = tiny
    script = load_script("inpaint")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    Image.new("L", (16, 16)).save(tmp_path / "small_mask.png")
    image, mask = folder / "image.png", folder / "mask.png"
    cases = [
        (["--image", tmp_path / "missing.png", "--mask", mask], ["--image", "no such file"]),
        (["--image", image, "--mask", tmp_path / "broken.png"], ["--mask", "cannot read it as an image"]),
        (["--image", image, "--mask", tmp_path / "small_mask.png"], ["mask size 16x16 differs", "32x32"]),
        (["--image", image], ["give --mask"]),
        (["--image", image, "--mask", mask, "--pad-left", 4], ["either --mask or --pad"]),
        (["--image", image, "--mask", mask, "--strength", 2], ["strength must be in (0, 1]"]),
        (["--image", image, "--mask", mask, "--mask-dilate", -1], ["mask_dilate must be"]),
    ]
    for extra, words in cases:
        code, out = run(script, folder, tmp_path, capsys, *extra)
        lines = out.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("inpaint.py: error: "), out.err
        assert all(word in lines[0] for word in words), lines[0]
        assert not (tmp_path / "out").exists()


EDIT = FIXTURES / "editing_dev"


@pytest.mark.skipif(not EDIT.is_dir(), reason="reference fixtures not present")
def test_inpainting_checkpoint_and_config_must_match(tmp_path, capsys):
    script = load_script("inpaint")
    Image.new("RGB", (64, 64)).save(tmp_path / "image.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    sd2 = FIXTURES / "sd2_dev"
    pairs = [(EDIT / "tiny_inpaint.safetensors", sd2 / "tiny_dev.yaml"),
             (sd2 / "tiny_dev.safetensors", EDIT / "tiny_inpaint.yaml")]
    for ckpt, config in pairs:
        argv = ["--ckpt", ckpt, "--config", config, "--image", tmp_path / "image.png", "--mask",
                tmp_path / "mask.png", "--prompt", "x", "--steps", 2, "--outdir", tmp_path / "out",
                "--no-autotune"]
        assert script.main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "inpaint" in lines[0], lines
        assert not (tmp_path / "out").exists()
