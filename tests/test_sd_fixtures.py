"""Reproduce the reference SD tensors (fixtures/sd2_dev, sd1_dev) from the original files."""
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

import ldm
from ldm.diffusion.schedule import sd_buffers
from conftest import FIXTURES, close_to_reference

CASES = {  # name: (folder, yaml, weights, reference, expected prediction type)
    "sd2_eps": ("sd2_dev", "tiny_dev.yaml", "tiny_dev.safetensors", "tiny_dev_ref", "eps"),
    "sd2_v": ("sd2_dev", "tiny_dev_v.yaml", "tiny_dev.safetensors", "tiny_dev_ref", "v"),
    "sd1": ("sd1_dev", "tiny_sd1.yaml", "tiny_sd1.safetensors", "tiny_sd1_ref", "eps"),
}
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="reference fixtures not present")


@pytest.fixture(scope="module", params=[(c, fmt) for c in CASES for fmt in ("safetensors", "ckpt")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def loaded(request, tmp_path_factory):
    name, fmt = request.param
    folder, yaml_name, weights, ref_name, prediction = CASES[name]
    base = FIXTURES / folder
    path = base / weights
    if fmt == "ckpt":  # a Lightning-style .ckpt written from the same state dict
        path = tmp_path_factory.mktemp(name) / "model.ckpt"
        torch.save({"state_dict": load_file(base / weights), "global_step": 0}, path)
    pipe = ldm.load_pipeline(path, config=base / yaml_name, dtype="fp32")
    ref = load_file(base / f"{ref_name}.safetensors")
    meta = json.loads((base / f"{ref_name}_index.json").read_text())["meta"]
    return pipe, ref, meta, prediction


def test_config_translation(loaded):
    pipe, _, _, prediction = loaded
    assert pipe.config.diffusion.prediction_type == prediction
    assert pipe.config.diffusion.scale_factor == 0.18215


def test_tokens_and_text_encoding(loaded):
    pipe, ref, meta, _ = loaded
    prompts = json.loads(meta["prompts"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = pipe.text_encoder.tokenize(prompts)
    assert torch.equal(tokens, ref["text.tokens"])
    # a prompt was truncated iff its reference row is full: no padding after the final <eot>
    eot = 49407
    full = {i for i, row in enumerate(ref["text.tokens"].tolist())
            if row[-1] == eot and row.index(eot) == len(row) - 1}
    warned = {i for i in range(len(prompts)) for w in caught
              if re.match(rf"prompt {i} is too long: [1-9]\d* of its", str(w.message))}
    assert warned == full
    with torch.no_grad():
        close_to_reference(pipe.encode_prompt(prompts), ref["text.cond"])


def test_unet_raw_output(loaded):
    pipe, ref, _, _ = loaded
    with torch.no_grad():
        out = pipe.unet(ref["inputs.unet_x"], ref["inputs.unet_t"], ref["inputs.unet_c"])
    close_to_reference(out, ref["unet.out"])


def test_vae_encode(loaded):
    pipe, ref, _, _ = loaded
    image = ref["inputs.image"]
    with torch.no_grad():
        vae = pipe.autoencoder
        close_to_reference(vae.quant_conv(vae.encoder(image)), ref["vae.encode_moments"])
        mean, logvar = pipe.encode_image(image)
        std = vae.encode(image).std
    close_to_reference(mean, ref["vae.encode_mean"])
    close_to_reference(logvar, ref["vae.encode_logvar"])
    close_to_reference(std, ref["vae.encode_std"])
    close_to_reference(pipe.config.diffusion.scale_factor * mean, ref["vae.encode_scaled_mode"])


def test_vae_decode(loaded):
    pipe, ref, _, _ = loaded
    with torch.no_grad():
        close_to_reference(pipe.decode_latents(ref["inputs.decode_z"]), ref["vae.decode_of_decode_z"])


def test_schedule_buffers(loaded):
    pipe, ref, _, _ = loaded
    for name, ours in sd_buffers(pipe.schedule).items():
        close_to_reference(ours, ref[f"schedule.{name}"])
