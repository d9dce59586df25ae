"""Reproduce every sampling run of the reference fixtures through pipe.sample.

DDIM eta 0 / eta 1 (injected per-step noise), eps and v, guidance 1, the text-conditioned runs
(encode_prompt + sample) and PLMS (sd1_dev); see ../shared/fixtures/README.md.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import ldm
from ldm.diffusion.timesteps import spaced_timesteps
from ldm.inference import SamplingOptions, sample
from conftest import FIXTURES, close_to_reference

MODELS = {  # name: (folder, yaml, weights, reference, run prefix, steps, guidance scale)
    "sd2_eps": ("sd2_dev", "tiny_dev.yaml", "tiny_dev.safetensors", "tiny_dev_ref", "eps", 8, 4.0),
    "sd2_v": ("sd2_dev", "tiny_dev_v.yaml", "tiny_dev.safetensors", "tiny_dev_ref", "v", 8, 4.0),
    "sd1": ("sd1_dev", "tiny_sd1.yaml", "tiny_sd1.safetensors", "tiny_sd1_ref", "eps", 10, 5.0),
}
RUNS = [(m, run) for m in MODELS for run in ("ddim_eta0", "ddim_eta1", "text_ddim_eta0")]
RUNS += [("sd2_eps", "ddim_eta0_scale1"), ("sd1", "ddim_eta0_scale1"), ("sd1", "plms")]
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="reference fixtures not present")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            folder, yaml_name, weights, ref_name, *_ = MODELS[name]
            base = FIXTURES / folder
            pipe = ldm.load_pipeline(base / weights, config=base / yaml_name)
            ref = load_file(str(base / f"{ref_name}.safetensors"))
            meta = json.loads((base / f"{ref_name}_index.json").read_text())["meta"]
            cache[name] = (pipe, ref, meta)
        return cache[name]
    return get


@pytest.mark.parametrize("model,run", RUNS, ids=[f"{m}-{r}" for m, r in RUNS])
def test_sampling_run_matches_reference(models, model, run):
    pipe, ref, meta = models(model)
    prefix, steps, scale = MODELS[model][4:]
    key = f"{prefix}.{run}"
    assert torch.equal(spaced_timesteps(1000, steps).flip(0), ref[f"{key}.ddim_timesteps"])
    if run.startswith("text"):  # conditioning from the prompts, one per batch element
        prompts = json.loads(meta["prompts"])
        context, uncond = pipe.encode_prompt(prompts[:2]), pipe.encode_prompt([""] * 2)
        close_to_reference(context, ref["text.cond"][:2], "text.cond")
    else:
        context, uncond = ref["inputs.c"], ref["inputs.uc"]
    eta = 1.0 if run == "ddim_eta1" else 0.0
    noise = ref["inputs.eta1_noise"] if eta else None
    sampler = "plms" if run == "plms" else "ddim"
    guidance = 1.0 if run.endswith("scale1") else scale
    xs, denoised = [], []
    options = SamplingOptions(steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance)
    final = sample(pipe, context, uncond if guidance != 1 else None, ref["inputs.x_T"], options,
                   noise=noise,
                   callback=lambda i, x, d: (xs.append(x.clone()), denoised.append(d.clone())))
    close_to_reference(torch.stack(xs), ref[f"{key}.x_inter"][1:], "x_inter")
    close_to_reference(torch.stack(denoised), ref[f"{key}.pred_x0"], "pred_x0")
    close_to_reference(final, ref[f"{key}.final"], "final")
    with torch.inference_mode():
        close_to_reference(pipe.decode_latents(final), ref[f"{key}.decoded"], "decoded")
