"""Editing against the reference fixtures (../shared/fixtures/editing_dev, see its README).

img2img on the tiny SD 2.x model (eps and v), the SD 2 inpainting model and the x4 upscaler:
every stored tensor, from pixels and encodings to each sampling step and the decoded image,
within 1e-4 of the reference's largest magnitude. The recorded random draws are consumed.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ldm
from conftest import FIXTURES, close_to_reference
from ldm.diffusion.samplers import visited_timesteps
from ldm.inference import SamplingOptions, encode_prompts
from ldm.inference.conditioning import concat_unet
from ldm.inference.encode import encode_latent, encode_moments, to_pixels
from ldm.inference.img2img import img2img, img2img_latents, stochastic_encode
from ldm.inference.inpaint import inpaint, inpaint_conditioning
from ldm.inference.masks import binarise, mask_tensor
from ldm.inference.sampling import edit_start
from ldm.inference.upscale import augment, upscale

EDITING = FIXTURES / "editing_dev"
pytestmark = pytest.mark.skipif(not EDITING.is_dir(), reason="reference fixtures not present")


def load(weights, config) -> "ldm.Pipeline":
    """A fixture model in float32 (the reference's precision), without measuring the machine."""
    return ldm.load_pipeline(weights, config=config, dtype=torch.float32, autotune=False)


def reference(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, meta) of one reference file."""
    tensors = load_file(str(EDITING / f"{name}.safetensors"))
    meta = json.loads((EDITING / f"{name}_index.json").read_text())["meta"]
    return tensors, meta


@pytest.fixture(scope="module")
def img2img_ref():
    return reference("img2img_ref")


@pytest.fixture(scope="module")
def sd2_pipes():
    base = FIXTURES / "sd2_dev"
    return {kind: load(base / "tiny_dev.safetensors", base / yaml)
            for kind, yaml in (("eps", "tiny_dev.yaml"), ("v", "tiny_dev_v.yaml"))}


def img2img_options(meta: dict[str, str]) -> SamplingOptions:
    return SamplingOptions(prompt=meta["prompt"], negative_prompt=meta["negative_prompt"],
                           steps=int(meta["S"]), sampler="ddim", eta=float(meta["ddim_eta"]),
                           guidance_scale=float(meta["scale"]), strength=float(meta["strength"]),
                           num_images=int(meta["batch_size"]), height=64, width=64)


def test_img2img_encoding_matches_reference(sd2_pipes, img2img_ref):
    ref, meta = img2img_ref
    pipe, options = sd2_pipes["eps"], img2img_options(meta)
    pixels = to_pixels([Image.fromarray(ref["inputs.init_image_uint8"].numpy())])
    close_to_reference(pixels, ref["inputs.init_image"], "init_image")
    pixels = pixels.repeat(2, 1, 1, 1)
    mean, logvar = encode_moments(pipe, pixels)
    close_to_reference(torch.cat([mean, logvar], 1), ref["img2img.encode_moments"], "moments")
    latent = encode_latent(pipe, pixels, noise=ref["img2img.posterior_noise"])
    close_to_reference(latent, ref["img2img.init_latent"], "init_latent")
    context, uncond = encode_prompts(pipe, options)
    close_to_reference(context, ref["img2img.c"], "c")
    close_to_reference(uncond, ref["img2img.uc"], "uc")
    plan = visited_timesteps("ddim", pipe.schedule, options.steps)
    assert torch.equal(plan.flip(0), ref["img2img.ddim_timesteps"])
    start = edit_start(pipe, options, options.strength)
    assert len(plan) - start == ref["img2img.t_enc"].item() == int(meta["t_enc"])
    z_enc = stochastic_encode(pipe, ref["img2img.init_latent"], options, start,
                              noise=ref["img2img.encode_noise"])
    close_to_reference(z_enc, ref["img2img.z_enc"], "z_enc")


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_img2img_run_matches_reference(sd2_pipes, img2img_ref, kind):
    """The front door from the picture, with the recorded draws: every step and the image."""
    ref, meta = img2img_ref
    pipe, options = sd2_pipes[kind], img2img_options(meta)
    start = edit_start(pipe, options, options.strength)
    plan = visited_timesteps("ddim", pipe.schedule, options.steps)
    assert torch.equal(plan[start:], ref[f"img2img.{kind}.timesteps"])
    steps = Steps()
    images = img2img(pipe, options, Image.fromarray(ref["inputs.init_image_uint8"].numpy()),
                     posterior_noise=ref["img2img.posterior_noise"],
                     encode_noise=ref["img2img.encode_noise"], callback=steps)
    steps.check(ref, f"img2img.{kind}")
    same_pixels(images, ref[f"img2img.{kind}.image"])
    with torch.inference_mode():
        decoded = pipe.decode_latents(steps.xs[-1])
    close_to_reference(decoded, ref[f"img2img.{kind}.decoded"], "decoded")
    close_to_reference((decoded.clamp(-1, 1) + 1) / 2, ref[f"img2img.{kind}.image"], "image")


def test_img2img_from_the_latent_matches_reference(sd2_pipes, img2img_ref):
    """img2img_latents from the reference's init latent (the API below the front door)."""
    ref, meta = img2img_ref
    pipe, options = sd2_pipes["eps"], img2img_options(meta)
    final = img2img_latents(pipe, ref["img2img.c"], ref["img2img.uc"], ref["img2img.init_latent"],
                            options, options.strength, encode_noise=ref["img2img.encode_noise"])
    close_to_reference(final, ref["img2img.eps.final"], "final")


def same_pixels(images: list[Image.Image], ref: torch.Tensor) -> None:
    """8-bit images equal to a reference image in [0, 1] up to rounding."""
    ours = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    expected = (ref * 255).round()
    assert (ours.double() - expected.double()).abs().max() <= 1


@pytest.fixture(scope="module")
def inpaint_model():
    pipe = load(EDITING / "tiny_inpaint.safetensors", EDITING / "tiny_inpaint.yaml")
    return pipe, *reference("tiny_inpaint_ref")


def inpaint_options(meta: dict[str, str]) -> SamplingOptions:
    return SamplingOptions(prompt=meta["prompt"], steps=int(meta["ddim_steps"]), sampler="ddim",
                           eta=float(meta["ddim_eta"]), guidance_scale=float(meta["scale"]),
                           num_images=int(meta["num_samples"]))


def test_inpaint_conditioning_matches_reference(inpaint_model):
    pipe, ref, meta = inpaint_model
    pixels = to_pixels([Image.fromarray(ref["inputs.image_uint8"].numpy())] * 2)
    close_to_reference(pixels, ref["inpaint.batch_image"], "batch_image")
    mask = mask_tensor(Image.fromarray(ref["inputs.mask_uint8"].numpy())).expand(2, 1, 128, 128)
    close_to_reference(binarise(mask), ref["inpaint.batch_mask"], "batch_mask")
    close_to_reference(pixels * (binarise(mask) < 0.5), ref["inpaint.batch_masked_image"],
                       "masked_image")
    concat = inpaint_conditioning(pipe, pixels, mask, noise=ref["inpaint.masked_image_posterior_noise"])
    close_to_reference(concat[:, :1], ref["inpaint.mask_latent"], "mask_latent")
    close_to_reference(concat[:, 1:], ref["inpaint.masked_image_latent"], "masked_image_latent")
    close_to_reference(concat, ref["inpaint.c_concat"], "c_concat")
    context, uncond = encode_prompts(pipe, inpaint_options(meta))
    close_to_reference(context, ref["inpaint.c"], "c")
    close_to_reference(uncond, ref["inpaint.uc"], "uc")
    unet = concat_unet(pipe.unet, ref["inputs.unet_c_concat"])
    with torch.inference_mode():
        out = unet(ref["inputs.unet_x"], ref["inputs.unet_t"], ref["inputs.unet_c"])
    close_to_reference(out, ref["unet.out"], "unet.out")


def test_inpaint_run_matches_reference(inpaint_model):
    """The front door from the pictures, with the recorded draws: every step and the image."""
    pipe, ref, meta = inpaint_model
    options = inpaint_options(meta)
    assert torch.equal(visited_timesteps("ddim", pipe.schedule, options.steps), ref["inpaint.timesteps"])
    steps = Steps()
    images = inpaint(pipe, options, Image.fromarray(ref["inputs.image_uint8"].numpy()),
                     Image.fromarray(ref["inputs.mask_uint8"].numpy()), x_T=ref["inpaint.x_T"],
                     masked_image_noise=ref["inpaint.masked_image_posterior_noise"],
                     noise=ref["inpaint.step_noise"], callback=steps)
    steps.check(ref, "inpaint")
    same_pixels(images, ref["inpaint.image"])
    with torch.inference_mode():
        close_to_reference(pipe.decode_latents(steps.xs[-1]), ref["inpaint.decoded"], "decoded")


class Steps:
    """A sampling callback keeping every step's latent and denoised estimate."""

    def __init__(self) -> None:
        self.xs: list[torch.Tensor] = []
        self.denoised: list[torch.Tensor] = []

    def __call__(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        self.xs.append(x.clone())
        self.denoised.append(denoised.clone())

    def check(self, ref: dict[str, torch.Tensor], prefix: str) -> None:
        """x after each step, pred_x0 per step and the final latent against the reference."""
        close_to_reference(torch.stack(self.xs), ref[f"{prefix}.x_steps"][1:], "x_steps")
        close_to_reference(torch.stack(self.denoised), ref[f"{prefix}.pred_x0"], "pred_x0")
        close_to_reference(self.xs[-1], ref[f"{prefix}.final"], "final")


@pytest.fixture(scope="module")
def x4_model():
    pipe = load(EDITING / "tiny_x4.safetensors", EDITING / "tiny_x4.yaml")
    return pipe, *reference("tiny_x4_ref")


def x4_options(meta: dict[str, str]) -> SamplingOptions:
    return SamplingOptions(prompt=meta["prompt"], steps=int(meta["steps"]), sampler="ddim",
                           eta=float(meta["ddim_eta"]), guidance_scale=float(meta["scale"]),
                           num_images=int(meta["num_samples"]), noise_level=int(meta["noise_level"]))


def test_upscaler_conditioning_matches_reference(x4_model):
    pipe, ref, meta = x4_model
    pixels = to_pixels([Image.fromarray(ref["inputs.lr_uint8"].numpy())] * 2)
    close_to_reference(pixels, ref["x4.lr"], "lr")
    x_aug = augment(pipe, ref["x4.lr"], int(meta["noise_level"]), ref["x4.aug_noise"])
    close_to_reference(x_aug, ref["x4.x_aug"], "x_aug")
    context, uncond = encode_prompts(pipe, x4_options(meta))
    close_to_reference(context, ref["x4.c"], "c")
    close_to_reference(uncond, ref["x4.uc"], "uc")
    unet = concat_unet(pipe.unet, ref["inputs.unet_c_concat"], ref["inputs.unet_y"])
    with torch.inference_mode():
        out = unet(ref["inputs.unet_x"], ref["inputs.unet_t"], ref["inputs.unet_c"])
    close_to_reference(out, ref["unet.out"], "unet.out")


def test_upscaler_run_matches_reference(x4_model):
    """The front door from the low-res picture, with the recorded draws: every step, the image."""
    pipe, ref, meta = x4_model
    options = x4_options(meta)
    plan = visited_timesteps("ddim", pipe.schedule, options.steps)
    assert len(plan) == 16 and torch.equal(plan, ref["x4.timesteps"])  # S=15: 16 steps
    steps = Steps()
    images = upscale(pipe, options, Image.fromarray(ref["inputs.lr_uint8"].numpy()),
                     x_T=ref["x4.x_T"], aug_noise=ref["x4.aug_noise"], callback=steps)
    steps.check(ref, "x4")
    same_pixels(images, ref["x4.image"])
    with torch.inference_mode():
        close_to_reference(pipe.decode_latents(steps.xs[-1]), ref["x4.decoded"], "decoded")
