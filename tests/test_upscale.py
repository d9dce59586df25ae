"""x4 upscaling: output size, noise-level range, models used for the wrong task, the script."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from conftest import FIXTURES, load_script
from ldm.errors import SamplingError
from ldm.inference import SamplingOptions, img2img, txt2img, upscale
from ldm.inference.upscale import noise_level_range

EDIT = FIXTURES / "editing_dev"
pytestmark = pytest.mark.skipif(not EDIT.is_dir(), reason="reference fixtures not present")
X4 = (EDIT / "tiny_x4.safetensors", EDIT / "tiny_x4.yaml")


@pytest.fixture(scope="module")
def x4():
    return ldm.load_pipeline(X4[0], config=X4[1], dtype=torch.float32, autotune=False)


def low_res(size=(12, 8)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_upscale_is_four_times_larger_and_level_matters(x4):
    assert noise_level_range(x4) == (0, 350)
    options = SamplingOptions(prompt="a cat", steps=3, guidance_scale=3.0, noise_level=0)
    (quiet,) = upscale(x4, options, low_res())
    assert quiet.size == (48, 32)
    from dataclasses import replace
    (noisy,) = upscale(x4, replace(options, noise_level=300), low_res())
    assert not np.array_equal(np.asarray(quiet), np.asarray(noisy))


def test_wrong_level_and_wrong_task_are_refused(x4):
    with pytest.raises(SamplingError, match=r"noise level must be in 0\.\.350"):
        upscale(x4, SamplingOptions(prompt="x", steps=2, noise_level=351), low_res())
    with pytest.raises(SamplingError, match="noise level must be a non-negative integer"):
        SamplingOptions(noise_level=-1)
    with pytest.raises(SamplingError, match="x4 upscaler model"):
        txt2img(x4, SamplingOptions(prompt="x", steps=2))
    with pytest.raises(SamplingError, match="x4 upscaler model.*upscale.py"):
        img2img(x4, SamplingOptions(prompt="x", steps=2, strength=0.5), low_res())


def run(tmp_path, capsys, *extra):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "small.png")
    argv = ["--ckpt", X4[0], "--config", X4[1], "--outdir", tmp_path / "out", "--steps", 2,
            "--no-autotune", *extra]
    code = load_script("upscale").main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_script_writes_the_larger_image(tmp_path, capsys):
    code, out = run(tmp_path, capsys, "--image", tmp_path / "small.png", "--noise-level", 20)
    assert code == 0, out.err
    with Image.open(tmp_path / "out" / "samples" / "00000.png") as image:
        assert image.size == (64, 64)
        params = json.loads(image.text["parameters"])
    assert params["task"] == "upscale" and params["noise_level"] == 20 and params["prompt"] == ""


@pytest.mark.parametrize("extra,words", [
    (["--image", "MISSING"], ["--image", "no such file"]),
    (["--image", "SMALL", "--noise-level", 351], ["noise level must be in 0..350"]),
    (["--image", "SMALL", "--noise-level", -5], ["noise level must be a non-negative integer"]),
    (["--image", "SMALL", "--vae-tile", 0, "--H", 2048, "--W", 2048], ["too large", "vae_tile 0"]),
])
def test_script_bad_input_exits_2_without_files(tmp_path, capsys, extra, words):
    extra = [{"MISSING": tmp_path / "missing.png", "SMALL": tmp_path / "small.png"}.get(str(e), e)
             for e in extra]
    code, out = run(tmp_path, capsys, *extra)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("upscale.py: error: "), out.err
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "out").exists()


def test_text_to_image_model_is_refused_by_the_upscale_script(tmp_path, capsys):
    sd2 = FIXTURES / "sd2_dev"
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    argv = ["--ckpt", sd2 / "tiny_dev.safetensors", "--config", sd2 / "tiny_dev.yaml", "--image",
            tmp_path / "small.png", "--outdir", tmp_path / "out", "--steps", 2, "--no-autotune"]
    assert load_script("upscale").main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "text-to-image model" in err and "txt2img" in err
    assert not (tmp_path / "out").exists()
