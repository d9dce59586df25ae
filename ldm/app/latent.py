"""Page: the VAE's latent space: reconstructions, channels, scale factor, interpolations."""
from __future__ import annotations

import math
from dataclasses import replace

import streamlit as st
import torch
from torch import Tensor

from ldm.app.common import fit, image_input, pipeline, to_image, to_tensor
from ldm.errors import LdmError
from ldm.inference import (SamplingOptions, encode_prompts, latents_to_images, resolve, sample,
                           start_noise)
from ldm.inference.conditioning import require_conditioning
from ldm.inference.encode import encode_latent
from ldm.inference.images import decode
from ldm.pipeline import Pipeline


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation: Gaussian noise keeps its norm (a straight line would shrink it)."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def channel_images(latent: Tensor, side: int) -> list:
    """Each latent channel [h, w] stretched to its own min..max, as a grey image."""
    images = []
    for channel in latent:
        lo, hi = channel.min(), channel.max()
        grey = ((channel - lo) / (hi - lo + 1e-8) * 2 - 1).expand(3, -1, -1)
        images.append(to_image(grey, side))
    return images


def reconstruction(pipe: Pipeline) -> None:
    """Image -> latent -> image, with the latent's channels and statistics."""
    image, text = image_input("latent")
    factor = pipe.downsampling_factor
    side = max(factor, (pipe.config.autoencoder.resolution // factor) * factor)
    pixels = to_tensor(fit(image, side))
    with st.spinner("Encoding and decoding..."), torch.inference_mode():
        z = encode_latent(pipe, pixels.to(pipe.device), generator=torch.Generator().manual_seed(0))
        recon = decode(pipe, z).cpu()
    mse = float((recon - pixels).pow(2).mean())
    psnr = 10 * math.log10(4 / max(mse, 1e-12))  # peak-to-peak 2 in [-1, 1]
    cols = st.columns(4)
    cols[0].image(to_image(pixels[0], 160), caption=text or "input", width=160)
    cols[1].image(to_image(recon[0], 160), caption="reconstruction", width=160)
    cols[2].metric("PSNR", f"{psnr:.1f} dB")
    cols[3].metric("Scale factor", f"{pipe.config.diffusion.scale_factor:.5f}",
                   help="Latents are multiplied by it so the U-Net sees roughly unit variance.")
    st.caption(f"Latent {tuple(z.shape[1:])} (factor {factor}); scaled latent std "
               f"{float(z.std()):.3f}, mean {float(z.mean()):.3f}")
    st.image(channel_images(z[0].float().cpu(), 96),
             caption=[f"channel {c}" for c in range(z.shape[1])], width=96)


def interpolate(pipe: Pipeline, options: SamplingOptions, contexts: list[Tensor],
                starts: list[Tensor], uncond: Tensor | None) -> list:
    """Sample one image per (context, start noise) pair, with progress."""
    bar = st.progress(0.0, text="Interpolating...")
    images = []
    for k, (context, x_T) in enumerate(zip(contexts, starts)):
        generator = torch.Generator().manual_seed(options.seed)
        latents = sample(pipe, context, uncond, x_T, options, generator=generator)
        images += latents_to_images(pipe, latents, options.vae_tile)
        bar.progress((k + 1) / len(starts), text=f"Frame {k + 1} of {len(starts)}")
    bar.empty()
    return images


def interpolations(pipe: Pipeline) -> None:
    """Between two seeds (slerp of the start noise) and two prompts (lerp of the text context)."""
    prompt_a = st.text_input("Prompt A", "a red circle on a blue background", key="interp_a")
    prompt_b = st.text_input("Prompt B", "a yellow square on a green background", key="interp_b")
    cols = st.columns(4)
    seed_a = int(cols[0].number_input("Seed A", 0, 2**31 - 1, 1, key="interp_seed_a"))
    seed_b = int(cols[1].number_input("Seed B", 0, 2**31 - 1, 2, key="interp_seed_b"))
    frames = int(cols[2].number_input("Frames", 2, 12, 5, key="interp_frames"))
    steps = int(cols[3].number_input("Steps", 1, 200, 10, key="interp_steps"))
    mode = st.radio("Interpolate", ["Seeds (prompt A)", "Prompts (seed A)"], horizontal=True,
                    key="interp_mode")
    if not st.button("Interpolate", key="interp_run"):
        return
    if not prompt_a.strip() or not prompt_b.strip():
        st.error("Enter both prompts.")
        return
    try:
        require_conditioning(pipe, "crossattn")  # inpainting / upscaling models need more inputs
        base = resolve(SamplingOptions(prompt=prompt_a, steps=steps, seed=seed_a,
                                       guidance_scale=5.0), pipe)
    except LdmError as err:
        st.error(str(err))
        return
    weights = [k / (frames - 1) for k in range(frames)]
    context_a, uncond = encode_prompts(pipe, base)
    noise_a, _ = start_noise(pipe, base)
    if mode.startswith("Seeds"):
        noise_b, _ = start_noise(pipe, replace(base, seed=seed_b))
        starts = [slerp(noise_a, noise_b, w) for w in weights]
        contexts = [context_a] * frames
    else:
        with torch.inference_mode():
            context_b = pipe.encode_prompt([prompt_b])
        contexts = [torch.lerp(context_a, context_b, w) for w in weights]
        starts = [noise_a] * frames
    images = interpolate(pipe, base, contexts, starts, uncond)
    st.image(images, caption=[f"w = {w:.2f}" for w in weights], width=128)


def page() -> None:
    """Draw the page."""
    pipe = pipeline()
    if pipe is None:
        return
    st.subheader("VAE reconstruction and latent channels")
    reconstruction(pipe)
    st.subheader("Interpolation")
    interpolations(pipe)
