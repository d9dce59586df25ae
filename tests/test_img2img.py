"""img2img: seeds per image, explicit random tensors, every sampler, strength, the script."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from conftest import load_script, tiny_pipeline
from ldm.errors import SamplingError
from ldm.inference import SamplingOptions, img2img, task_steps
from ldm.inference.img2img import resolve_for_image
from ldm.diffusion.samplers import SAMPLERS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("model")
    pipe.save(folder / "tiny.safetensors")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    picture.save(folder / "init.png")
    loaded = ldm.load_pipeline(folder / "tiny.safetensors", dtype=torch.float32, autotune=False)
    return loaded, folder


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def edit(pipe, folder, **kwargs):
    options = SamplingOptions(**{"prompt": "a red circle", "steps": 8, "guidance_scale": 3.0,
                                 "strength": 0.5, **kwargs})
    return pixels(img2img(pipe, options, Image.open(folder / "init.png")))


def test_batch_image_k_is_seed_plus_k_and_strength_matters(tiny):
    pipe, folder = tiny
    batch = edit(pipe, folder, seed=3, num_images=2)
    assert batch.shape == (2, 32, 32, 3) and np.array_equal(batch, edit(pipe, folder, seed=3, num_images=2))
    assert np.abs(edit(pipe, folder, seed=4)[0] - batch[1]).max() <= 1
    source = pixels([Image.open(folder / "init.png")])[0]
    light = edit(pipe, folder, seed=3, strength=0.25)[0]
    assert np.abs(light - source).mean() < np.abs(batch[0] - source).mean()


def test_every_random_tensor_can_be_given(tiny):
    pipe, folder = tiny
    g = torch.Generator().manual_seed(1)
    draws = {"posterior_noise": torch.randn(1, 4, 16, 16, generator=g),
             "encode_noise": torch.randn(1, 4, 16, 16, generator=g),
             "noise": torch.randn(4, 1, 4, 16, 16, generator=g)}
    runs = [pixels(img2img(pipe, SamplingOptions(prompt="x", steps=8, strength=0.5, eta=1.0,
                                                 seed=seed, guidance_scale=2.0),
                           Image.open(folder / "init.png"), **draws)) for seed in (0, 9)]
    assert np.array_equal(*runs)  # nothing left to the seed
    latent = torch.zeros(1, 4, 16, 16)
    from_latent = img2img(pipe, SamplingOptions(prompt="x", steps=8, strength=0.5, seed=0),
                          Image.open(folder / "init.png"), init_latent=latent)
    assert len(from_latent) == 1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_the_planned_steps(tiny, sampler):
    pipe, folder = tiny
    options = SamplingOptions(prompt="a red circle", steps=6, sampler=sampler, strength=0.5,
                              guidance_scale=2.0)
    seen = []
    images = img2img(pipe, options, Image.open(folder / "init.png"), callback=lambda i, x, d: seen.append(i))
    assert len(images) == 1 and len(seen) == 3 == task_steps(pipe, options)
    assert len(img2img(pipe, SamplingOptions(prompt="x", steps=3, sampler=sampler, strength=1.0),
                       Image.open(folder / "init.png"))) == 1


def test_image_size_follows_the_picture_or_the_options(tiny):
    pipe, _ = tiny
    picture = Image.new("RGB", (37, 21))
    resolved = resolve_for_image(SamplingOptions(), pipe, picture)
    assert (resolved.width, resolved.height) == (36, 20)  # truncated to the latent factor 2
    resolved = resolve_for_image(SamplingOptions(height=16, width=24), pipe, picture)
    assert (resolved.width, resolved.height) == (24, 16)
    with pytest.raises(SamplingError, match="smaller than the model's size step"):
        resolve_for_image(SamplingOptions(), pipe, Image.new("RGB", (1, 8)))


@pytest.mark.parametrize("kwargs,match", [
    ({"strength": 0}, r"strength must be in \(0, 1\]"),
    ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
    ({"strength": float("nan")}, r"strength must be in \(0, 1\]"),
    ({"strength": 0.1, "steps": 5}, "runs no denoising step"),
])
def test_strength_is_validated_when_options_are_built(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        SamplingOptions(**kwargs)


def run(script, folder, tmp_path, capsys, *extra):
    argv = ["--ckpt", folder / "tiny.safetensors", "--outdir", tmp_path / "out", "--steps", 4,
            "--no-autotune", *extra]
    code = script.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_script_writes_parameters_and_from_png_regenerates(tiny, tmp_path, capsys):
    _, folder = tiny
    script = load_script("img2img")
    code, out = run(script, folder, tmp_path, capsys, "--init-img", folder / "init.png",
                    "--prompt", "a blue square", "--strength", 0.5, "--n_samples", 2, "--seed", 5)
    assert code == 0, out.err
    made = tmp_path / "out" / "samples" / "00001.png"
    with Image.open(made) as image:
        params = json.loads(image.text["parameters"])
    assert params["task"] == "img2img" and params["strength"] == 0.5 and params["seed"] == 6
    assert params["inputs"]["init_img"]["path"] == str((folder / "init.png").resolve())
    assert script.main(["--from-png", str(made), "--outdir", str(tmp_path / "re"), "--no-autotune"]) == 0
    (again,) = (tmp_path / "re" / "samples").glob("*.png")
    with Image.open(again) as a, Image.open(made) as b:
        assert a.tobytes() == b.tobytes()
    assert load_script("txt2img").main(["--from-png", str(made), "--outdir", str(tmp_path / "t")]) == 2
    assert "made by img2img.py" in capsys.readouterr().err


def bad_inputs(folder, tmp_path):
    (tmp_path / "notimage.png").write_text("not an image")
    Image.new("RGB", (600, 600)).save(tmp_path / "large.png")
    changed = tmp_path / "changed.png"
    Image.new("RGB", (32, 32)).save(changed)
    return [
        (["--init-img", tmp_path / "missing.png"], "--init-img", "no such file"),
        (["--init-img", tmp_path / "notimage.png"], "--init-img", "cannot read it as an image"),
        ([], "give --init-img", "give --init-img"),
        (["--init-img", folder / "init.png", "--strength", 0], "strength", "must be in (0, 1]"),
        (["--init-img", folder / "init.png", "--strength", 1.5], "strength", "must be in (0, 1]"),
        (["--init-img", tmp_path / "large.png", "--vae-tile", 0], "too large", "vae_tile 0"),
    ]


def test_script_bad_input_exits_2_without_files(tiny, tmp_path, capsys):
    _, folder = tiny
    script = load_script("img2img")
    for extra, first, second in bad_inputs(folder, tmp_path):
        code, out = run(script, folder, tmp_path, capsys, "--prompt", "a red circle", *extra)
        assert code == 2, extra
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("img2img.py: error: "), out.err
        assert first in lines[0] and second in lines[0], lines[0]
        assert not (tmp_path / "out").exists()


def test_tiled_encoding_places_and_blends_tiles_exactly():
    """With a local encoder (2x2 average pooling) tiles blend back into the one-pass result."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from ldm.inference.encode import encode_moments

    def encode_image(pixels):
        mean = F.avg_pool2d(pixels, 2)
        return torch.cat([mean, mean[:, :1]], 1), torch.zeros_like(mean[:, :1]).expand(-1, 4, -1, -1)
    fake = SimpleNamespace(downsampling_factor=2, device=torch.device("cpu"), encode_image=encode_image)
    pixels = torch.randn(2, 3, 70, 94, generator=torch.Generator().manual_seed(0))
    whole, _ = encode_moments(fake, pixels)
    tiled, logvar = encode_moments(fake, pixels, tile=16)
    assert tiled.shape == (2, 4, 35, 47) and torch.allclose(tiled, whole, atol=1e-6)
    assert torch.equal(logvar, torch.zeros_like(logvar))
