"""The OpenVINO backend: traced graphs of plain PyTorch ops, outputs equal to PyTorch's at any
shape, the on-disk cache of converted models, the command line's flag and its bad input."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm._extension import fused_device_types
from ldm.errors import LdmError
from ldm.inference import SamplingOptions, inpaint, upscale
from ldm.inference import openvino_backend
from ldm.models.prepacked import set_prepacked, set_winograd
from conftest import FIXTURES, load_script, perturb, rel_l2, tiny_pipeline


def need_openvino():
    """Skip where openvino is not installed (the optional extra); a failure under CI=true,
    whose requirements install it."""
    if not openvino_backend.available():
        if os.environ.get("CI") == "true":
            pytest.fail("openvino is not installed (requirements-dev.txt pins it)")
        pytest.skip("the openvino extra: pip install -e '.[openvino]'")


def unet_inputs(seed, batch=2, side=(16, 16), t=(10.0, 500.0), width=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *side, generator=g), torch.tensor(t),
            torch.randn(batch, 77, width, generator=g))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_traced_networks_use_plain_ops_and_match_the_fast_path():
    """Tracing (what openvino.convert_model does) takes the plain form of every fast path:
    no ldm:: ops, no Winograd or packed kernels, the direct upsampling; same outputs."""
    pipe = tiny_pipeline()
    unet, decoder = pipe.unet, pipe.autoencoder.decoder
    for net in (unet, decoder):
        set_prepacked(net, True)
        set_winograd(net, lambda conv: {(16, 16): 2, (8, 8): 2, (32, 32): 4})
    args = unet_inputs(0)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for net, example in ((unet, args), (decoder, (z,))):
            eager = net(*example)
            traced = torch.jit.trace(net, example, check_trace=False)
            graph = str(traced.inlined_graph)
            assert "ldm::" not in graph
            assert "aten::upsample_nearest2d" in graph
            assert rel_l2(traced(*example), eager) < 1e-5
    if "cpu" in fused_device_types("group_norm_silu"):  # the eager path did use the kernel
        with torch.no_grad(), torch.autograd.profiler.profile() as prof:
            unet(*args)
        assert any(e.name == "ldm::group_norm_silu" for e in prof.function_events)


def examples():
    x, t, c = unet_inputs(0)
    return {"x": x, "timesteps": t, "context": c}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny pipeline, its PyTorch outputs, and the same pipeline run by OpenVINO."""
    need_openvino()
    pipe = tiny_pipeline()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    odd = unet_inputs(2, batch=1, side=(12, 20), t=(7,))  # another shape, integer timesteps
    with torch.inference_mode():
        expected = {"unet": pipe.unet(*unet_inputs(1)), "odd": pipe.unet(*odd),
                    "decode": pipe.decode_latents(z)}
    torch_unet = pipe.unet
    cache = tmp_path_factory.mktemp("ov-cache")
    openvino_backend.use_openvino(pipe, torch.float32, cache)
    return pipe, torch_unet, expected, (z, odd), cache


def test_outputs_match_pytorch_at_several_shapes(converted):
    pipe, _, expected, (z, odd), _ = converted
    assert isinstance(pipe.unet, openvino_backend.OpenVINONet)
    assert isinstance(pipe.autoencoder.decoder, openvino_backend.OpenVINONet)
    assert not list(pipe.unet.parameters())  # the PyTorch weights are let go
    with torch.inference_mode():
        assert rel_l2(pipe.unet(*unet_inputs(1)), expected["unet"]) < 1e-5
        assert rel_l2(pipe.unet(*odd), expected["odd"]) < 1e-5
        assert rel_l2(pipe.decode_latents(z), expected["decode"]) < 1e-5
        # called by name, and in the caller's dtype
        x, t, c = unet_inputs(1)
        out = pipe.unet(x.bfloat16(), timesteps=t, context=c, y=None)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out.float(), expected["unet"]) < 1e-2
    with pytest.raises(LdmError, match="converted for inputs"):
        pipe.unet(x, t, c, torch.zeros(2))  # class labels it was not converted for
    with pytest.raises(LdmError, match="cannot take inputs"):
        pipe.unet(x[:, :3], t, c)  # channels its weights do not have


def test_bf16_hint_stays_close_to_fp32(converted):
    _, torch_unet, expected, _, cache = converted
    net = openvino_backend.openvino_net(torch_unet, examples(), torch.bfloat16, cache)
    with torch.inference_mode():
        assert rel_l2(net(*unet_inputs(1)), expected["unet"]) < 3e-2


def test_converted_models_are_cached_by_weights(converted, monkeypatch):
    _, torch_unet, expected, _, cache = converted
    folders = [p for p in cache.iterdir() if p.name != "compiled"]
    assert len(folders) == 2  # the U-Net and the decoder
    assert all((p / "model.xml").is_file() and (p / "model.bin").is_file() for p in folders)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]
    assert list((cache / "compiled").iterdir())  # OpenVINO's compiled models
    import openvino

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the model is cached")
    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = openvino_backend.openvino_net(torch_unet, examples(), torch.float32, cache)
    with torch.inference_mode():
        assert rel_l2(again(*unet_inputs(1)), expected["unet"]) < 1e-5
    changed = perturb(tiny_pipeline().unet, 0.01, seed=9)  # other weights: another digest
    with pytest.raises(AssertionError, match="converted again"):
        openvino_backend.openvino_net(changed, examples(), torch.float32, cache)
    monkeypatch.undo()
    (bin_file,) = [p / "model.bin" for p in folders
                   if p.name == openvino_backend.digest(torch_unet, examples())]
    bin_file.write_bytes(bin_file.read_bytes()[:1000])  # damaged: converted again in its place
    repaired = openvino_backend.openvino_net(torch_unet, examples(), torch.float32, cache)
    with torch.inference_mode():
        assert rel_l2(repaired(*unet_inputs(1)), expected["unet"]) < 1e-5
    assert bin_file.stat().st_size > 1000


def test_bad_networks_and_missing_package_are_one_clear_error(monkeypatch, tmp_path):
    need_openvino()
    pipe = tiny_pipeline()
    with pytest.raises(LdmError, match="fp32 or bf16"):
        openvino_backend.use_openvino(pipe, torch.float16, tmp_path)
    with pytest.raises(LdmError, match="load the pipeline in fp32"):
        openvino_backend.openvino_net(pipe.unet.bfloat16(), examples(), torch.float32, None)
    with pytest.raises(ValueError, match="backend"):
        ldm.load_pipeline("unused.safetensors", backend="onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(LdmError, match=r"pip install -e '\.\[openvino\]'"):
        openvino_backend.use_openvino(pipe)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    tiny_pipeline().save(path)
    return path


def test_script_backend_openvino_makes_the_torch_image(tiny_checkpoint, tmp_path, capsys):
    need_openvino()
    script = load_script("txt2img")
    # fp32 on both sides: on CPUs with native bf16 the default is bf16, whose roundings
    # differ between the two runtimes (test_bf16_hint_stays_close_to_fp32)
    common = ["--ckpt", str(tiny_checkpoint), "--steps", "3", "--seed", "5",
              "--prompt", "a green triangle", "--precision", "fp32"]
    assert script.main([*common, "--outdir", str(tmp_path / "pt")]) == 0
    assert script.main([*common, "--backend", "openvino", "--outdir", str(tmp_path / "ov")]) == 0
    with Image.open(tmp_path / "pt" / "samples" / "00000.png") as a, \
            Image.open(tmp_path / "ov" / "samples" / "00000.png") as b:
        diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
        assert '"backend": "openvino"' in b.text["parameters"]
    assert diff.max() <= 2, diff.max()
    assert "converting UNetModel" in capsys.readouterr().err


BAD = [(["--backend", "openvino", "--compile"], "--compile is for the torch backend"),
       (["--backend", "openvino", "--device", "cuda"], "runs on the CPU")]


@pytest.mark.parametrize("extra,match", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_script_bad_backend_flags_exit_2(tiny_checkpoint, tmp_path, capsys, extra, match):
    need_openvino()
    script = load_script("txt2img")
    out = tmp_path / "out"
    argv = ["--prompt", "x", "--ckpt", str(tiny_checkpoint), "--outdir", str(out), *extra]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_script_without_openvino_says_how_to_install(tiny_checkpoint, tmp_path, capsys,
                                                     monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    script = load_script("txt2img")
    argv = ["--prompt", "x", "--ckpt", str(tiny_checkpoint), "--outdir", str(tmp_path / "o"),
            "--backend", "openvino"]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install" in err, err
    assert Path(tmp_path / "o").exists() is False


EDIT = FIXTURES / "editing_dev"


@pytest.mark.skipif(not EDIT.is_dir(), reason="reference fixtures not present")
def test_editing_models_run_through_openvino_as_through_pytorch():
    """The inpainting U-Net (9 input channels) and the x4 upscaler's (class labels for the
    noise level, a VAE of factor 4) convert and give PyTorch's images."""
    need_openvino()
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(32)[:, None] < 16, 255, 0).astype(np.uint8)
                           .repeat(32, axis=1))
    small = picture.resize((8, 8))
    jobs = {"tiny_inpaint": lambda pipe: inpaint(pipe, SamplingOptions(
                prompt="a cat", steps=3, seed=1, height=32, width=32), picture, mask),
            "tiny_x4": lambda pipe: upscale(pipe, SamplingOptions(
                prompt="a cat", steps=3, seed=1, guidance_scale=3.0, noise_level=20), small)}
    for name, job in jobs.items():
        files = (EDIT / f"{name}.safetensors", EDIT / f"{name}.yaml")
        images = [job(ldm.load_pipeline(*files, dtype=torch.float32, backend=backend,
                                        **({"autotune": False} if backend == "torch" else {})))
                  for backend in ("torch", "openvino")]
        a, b = (np.asarray(im[0]).astype(int) for im in images)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, (name, np.abs(a - b).max())
