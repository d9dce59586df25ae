"""txt2img: seeds per image, the script's files and PNG parameters, --from-png, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.errors import SamplingError
from ldm.inference import SamplingOptions, resolve, txt2img
from ldm.inference.options import DEFAULT_TILE
from conftest import load_script, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "txt2img.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = tiny_pipeline()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    pipe.save(path)
    return ldm.load_pipeline(path), path


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def generate(pipe, prompt, **kwargs):
    return pixels(txt2img(pipe, SamplingOptions(prompt=prompt, **kwargs)))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_seed_reproduces_and_batch_image_k_is_seed_plus_k(tiny, sampler):
    pipe, _ = tiny
    kwargs = dict(steps=4, sampler=sampler, guidance_scale=3.0)
    batch = generate(pipe, "a red circle", seed=10, num_images=3, **kwargs)
    assert batch.shape == (3, 32, 32, 3)
    again = generate(pipe, "a red circle", seed=10, num_images=3, **kwargs)
    assert np.array_equal(batch, again)
    for k in range(3):
        single = generate(pipe, "a red circle", seed=10 + k, **kwargs)[0]
        assert np.abs(single - batch[k]).max() <= 1, k  # batched kernels may round differently
    other = generate(pipe, "a red circle", seed=11, **kwargs)[0]
    assert not np.array_equal(other, batch[0])


def test_prompt_list_is_one_image_per_prompt(tiny):
    pipe, _ = tiny
    kwargs = dict(steps=3, guidance_scale=3.0, seed=4)
    batch = generate(pipe, ("a red circle", "a blue square"), **kwargs)
    assert batch.shape[0] == 2
    second = generate(pipe, "a blue square", **{**kwargs, "seed": 5})[0]
    assert np.abs(second - batch[1]).max() <= 1
    with pytest.raises(SamplingError, match="one image per prompt"):
        SamplingOptions(prompt=("a", "b"), num_images=3)


OPTION_ERRORS = [({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"),
                 ({"sampler": "heun"}, "unknown sampler"), ({"guidance_scale": -1}, "guidance"),
                 ({"guidance_scale": float("nan")}, "guidance"), ({"eta": 2}, "eta"),
                 ({"sampler": "plms", "eta": 0.5}, "deterministic"), ({"height": 0}, "height"),
                 ({"num_images": 0}, "num_images"), ({"seed": -1}, "seed"),
                 ({"vae_tile": 3}, "vae_tile"), ({"prompt": 3}, "string")]


@pytest.mark.parametrize("kwargs,match", OPTION_ERRORS, ids=[str(k) for k, _ in OPTION_ERRORS])
def test_options_are_validated_when_built(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        SamplingOptions(**kwargs)


def test_resolve_checks_the_model(tiny):
    pipe, _ = tiny
    for kwargs, match in (({"height": 33}, "multiple of 2"), ({"steps": 1001}, "1..1000")):
        with pytest.raises(SamplingError, match=match):
            resolve(SamplingOptions(**kwargs), pipe)
    resolved = resolve(SamplingOptions(), pipe)
    assert (resolved.height, resolved.width, resolved.vae_tile) == (32, 32, 0)


def test_tiled_decode_is_seamless_and_close_to_one_pass(tiny):
    """vae_tile decodes in overlapping tiles: same size, close to one pass, automatic when large."""
    pipe, _ = tiny
    kwargs = dict(height=64, width=96, steps=2, guidance_scale=3.0, seed=3)
    one_pass = generate(pipe, "a red circle", vae_tile=0, **kwargs)
    tiled = generate(pipe, "a red circle", vae_tile=16, **kwargs)
    assert tiled.shape == one_pass.shape == (1, 64, 96, 3)
    # Only the decoder's per-tile GroupNorm statistics differ (the sampled latents are equal).
    assert np.abs(tiled - one_pass).mean() < 6.0
    assert resolve(SamplingOptions(height=128, width=128), pipe).vae_tile == 0
    assert resolve(SamplingOptions(height=256, width=128), pipe).vae_tile == DEFAULT_TILE


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=600)


def read_parameters(path):
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def test_script_writes_numbered_pngs_with_parameters_and_from_png_regenerates(tiny, tmp_path):
    _, ckpt = tiny
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--outdir", out, "--steps", 3, "--n_samples", 2, "--seed", 7,
            "--prompt", "a blue square", "--negative-prompt", "blurry", "--scale", 4]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file() and str(out) in first.stdout
    params = read_parameters(out / "samples" / "00001.png")
    assert params["prompt"] == "a blue square" and params["negative_prompt"] == "blurry"
    assert params["seed"] == 8 and params["sampler"] == "ddim" and params["steps"] == 3
    assert params["scale"] == 4 and (params["height"], params["width"]) == (32, 32)
    assert params["ldm_version"] == ldm.__version__ and len(params["model_hash"]) == 64
    second = run_script(*args)  # never overwrites: numbering continues
    assert second.returncode == 0, second.stderr
    assert len(list((out / "samples").glob("*.png"))) == 4 and (out / "grid-0001.png").is_file()
    again = run_script("--from-png", out / "samples" / "00001.png", "--outdir", tmp_path / "re")
    assert again.returncode == 0, again.stderr
    (regenerated,) = (tmp_path / "re" / "samples").glob("*.png")
    with Image.open(regenerated) as a, Image.open(out / "samples" / "00001.png") as b:
        assert a.tobytes() == b.tobytes()


def test_from_png_refuses_other_model_and_bad_chunks(tiny, tmp_path, capsys):
    script = load_script("txt2img")
    from PIL.PngImagePlugin import PngInfo
    _, ckpt = tiny
    params = {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "batch_seed": 3,
              "batch_size": 1, "index": 0, "steps": 2, "sampler": "ddim", "scale": 3.0, "eta": None,
              "height": 32, "width": 32, "model_hash": "0" * 64, "precision": "fp32"}
    cases = {"other_model": (params, "was made with model"),
             "bad_types": ({**params, "steps": "many"}, "not valid"),
             "no_json": ("{not json", "not valid")}
    for name, (content, match) in cases.items():
        info = PngInfo()
        info.add_text("parameters", content if isinstance(content, str) else json.dumps(content))
        png = tmp_path / f"{name}.png"
        Image.new("RGB", (32, 32)).save(png, pnginfo=info)
        out = tmp_path / f"out-{name}"
        assert script.main(["--from-png", str(png), "--ckpt", str(ckpt), "--outdir", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and match in err, (name, err)
        assert not out.exists()


def test_script_bad_input_subprocess_is_one_line(tmp_path):
    result = run_script("--prompt", "x", "--sampler", "heun", "--outdir", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "heun" in result.stderr
    assert not (tmp_path / "o").exists()


BAD_INPUTS = [
    (["--H", 33], "multiple of 2"),
    (["--steps", 0], "steps must be"),
    (["--steps", 5000], "1..1000"),
    (["--scale", -2], "guidance scale"),
    (["--scale", 1e6], "guidance scale"),
    (["--ddim_eta", 3], "eta must be"),
    (["--from-file", "EMPTY"], "no prompts"),
    (["--from-png", "NOTPNG"], "cannot read"),
    (["--ckpt", "MISSING"], "no such file"),
    (["--config", str(ROOT / "configs" / "sd1.yaml")], "does not match the config"),
    (["--config", "DUPKEY"], "duplicate key 'model' (line 3)"),
    (["--precision", "fp16", "--device", "cpu"], "fp16"),
    (["--prompt", ""], "non-empty"),
    (["--n_samples", 0], "n_samples"),
    (["--vae-tile", 3], "vae_tile"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--device", "cuda"], "no CUDA"))


@pytest.mark.parametrize("extra,match", BAD_INPUTS, ids=[" ".join(map(str, e)) for e, _ in BAD_INPUTS])
def test_script_bad_input_exits_2_without_files(tiny, tmp_path, capsys, extra, match):
    script = load_script("txt2img")
    _, ckpt = tiny
    (tmp_path / "EMPTY").write_text("\n  \n")
    (tmp_path / "NOTPNG").write_text("not an image")
    (tmp_path / "dup.yaml").write_text("model:\n  unet: {}\nmodel:\n  unet: {}\n")
    extra = [{"EMPTY": tmp_path / "EMPTY", "NOTPNG": tmp_path / "NOTPNG",
              "MISSING": tmp_path / "missing.safetensors",
              "DUPKEY": tmp_path / "dup.yaml"}.get(str(e), e) for e in extra]
    out = tmp_path / "out"
    argv = ["--prompt", "a red circle", "--steps", 2, "--ckpt", ckpt, "--outdir", out, *extra]
    assert script.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert not out.exists()


@pytest.mark.parametrize("upscaler", ["latent", "pixels"])
def test_hires_fix_doubles_the_size_and_counts_both_passes(tiny, upscaler):
    from ldm.inference import task_steps
    pipe, _ = tiny
    options = SamplingOptions(prompt="a red circle", steps=4, guidance_scale=3.0, seed=2,
                              hr_scale=2, hr_strength=0.5, hr_upscale=upscaler)
    seen = []
    (image,) = txt2img(pipe, options, callback=lambda i, x, d: seen.append(i))
    assert image.size == (64, 64)
    assert seen == list(range(6)) and task_steps(pipe, options) == 6  # 4 + int(0.5 * 4)
    with pytest.raises(SamplingError, match="hr_scale must be in"):
        SamplingOptions(hr_scale=1.0)
    with pytest.raises(SamplingError, match="hr_upscale must be one of"):
        SamplingOptions(hr_upscale="nearest")


def test_uniform_ddim_spacing_runs_more_steps_than_asked(tiny):
    from ldm.inference import run_steps
    pipe, _ = tiny
    options = SamplingOptions(prompt="x", steps=12, guidance_scale=1.0)
    seen = []
    txt2img(pipe, options, callback=lambda i, x, d: seen.append(i))
    assert len(seen) == run_steps(pipe, options) == 13  # range(0, 1000, 83) + 1
