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
from conftest import FIXTURES, close_to_reference, rel_l2

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
            pipe = ldm.load_pipeline(base / weights, config=base / yaml_name, dtype="fp32")
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


# bf16 (the default on CPUs with native bf16) keeps the sampler's latents in bf16 as well, so
# a whole run drifts further than one U-Net call (2%): the documented tolerance of a bf16
# sampling run against the reference's fp32, relative L2 (docs/sampling.md).
BF16_FINAL, BF16_DECODED = 0.03, 0.04


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_bf16_run_stays_within_its_tolerance(model, eta):
    folder, yaml_name, weights, ref_name, prefix, steps, scale = MODELS[model]
    base = FIXTURES / folder
    pipe = ldm.load_pipeline(base / weights, config=base / yaml_name, dtype="bf16")
    ref = load_file(str(base / f"{ref_name}.safetensors"))
    key = f"{prefix}.ddim_eta{int(eta)}"
    options = SamplingOptions(steps=steps, sampler="ddim", eta=eta, guidance_scale=scale)
    final = sample(pipe, ref["inputs.c"], ref["inputs.uc"], ref["inputs.x_T"], options,
                   noise=ref["inputs.eta1_noise"] if eta else None)
    assert final.dtype == torch.bfloat16
    assert rel_l2(final.float(), ref[f"{key}.final"]) < BF16_FINAL
    with torch.inference_mode():
        decoded = pipe.decode_latents(final)
    assert rel_l2(decoded.float(), ref[f"{key}.decoded"]) < BF16_DECODED
