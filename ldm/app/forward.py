"""Page: the forward process q(x_t | x_0) under several beta schedules, in pixels and latents."""
from __future__ import annotations

import matplotlib.pyplot as plt
import streamlit as st
import torch
from PIL import Image

from ldm.app.common import fit, image_input, pipeline, to_image, to_tensor
from ldm.config import DiffusionConfig
from ldm.diffusion.schedule import Schedule, make_schedule
from ldm.inference.encode import encode_latent
from ldm.inference.images import decode

T = 1000
TILE = 112  # pixels per picture: six schedules fit one row of the wide column
# DDPM's linear range, SD's scaled_linear range, improved DDPM's cosine (DESIGN.md section 3).
SCHEDULES = {
    "linear": DiffusionConfig(num_timesteps=T, beta_schedule="linear", linear_start=1e-4,
                              linear_end=0.02),
    "scaled_linear": DiffusionConfig(num_timesteps=T, beta_schedule="scaled_linear"),
    "cosine": DiffusionConfig(num_timesteps=T, beta_schedule="cosine"),
}


@st.cache_resource
def schedules(zero_snr: bool) -> dict[str, Schedule]:
    """Every schedule, plus its zero-terminal-SNR rescaling when asked."""
    result = {name: make_schedule(config) for name, config in SCHEDULES.items()}
    if zero_snr:
        for name, config in SCHEDULES.items():
            rescaled = DiffusionConfig(**{**config.__dict__, "zero_terminal_snr": True})
            result[f"{name} + zero SNR"] = make_schedule(rescaled)
    return result


def noised(x0: torch.Tensor, abar: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise


def schedule_plots(chosen: dict[str, Schedule], t: int) -> plt.Figure:
    """beta_t, alpha_bar_t and log SNR(t) per schedule, with t marked."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = torch.arange(T)
    for name, schedule in chosen.items():
        abar = schedule.alphas_cumprod
        snr = (abar / (1 - abar)).clamp(min=1e-12)  # zero terminal SNR: log 0 drawn at -27.6
        axes[0].plot(steps, schedule.betas, label=name)
        axes[1].plot(steps, abar, label=name)
        axes[2].plot(steps, snr.log(), label=name)
    for ax, title in zip(axes, ("beta_t", "alpha_bar_t", "log SNR(t)")):
        ax.axvline(t, color="black", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("t")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def page() -> None:
    """Draw the page."""
    st.caption("q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): the same image "
               "and the same noise, noised to step t by each schedule.")
    left, right = st.columns([1, 3])
    with left:
        image, text = image_input("forward")
        st.image(image, caption=text or "uploaded", width=128)
        zero_snr = st.checkbox("Also zero terminal SNR", key="forward_zero_snr")
        latent_view = st.checkbox("Through the VAE (latent space)", value=True,
                                  key="forward_latent")
    chosen = schedules(zero_snr)
    with right:
        t = st.slider("t", 0, T - 1, 250, key="forward_t")
        x0 = to_tensor(fit(image, 64))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        names = list(chosen)
        st.subheader("Pixel space")
        st.image([to_image(noised(x0, float(s.alphas_cumprod[t]), noise)[0], TILE)
                  for s in chosen.values()], caption=names, width=TILE)
        if latent_view:
            latent_row(image, chosen, t, names)
        st.pyplot(schedule_plots(chosen, t))
        plt.close("all")


def latent_row(image: Image.Image, chosen: dict[str, Schedule], t: int, names: list[str]) -> None:
    """x_t made in the model's latent space, decoded back to pixels."""
    st.subheader("Latent space (noised latent, decoded by the VAE)")
    pipe = pipeline()
    if pipe is None:
        return
    factor = pipe.downsampling_factor
    side = max(factor, (pipe.config.autoencoder.resolution // factor) * factor)
    with st.spinner("Encoding and decoding..."), torch.inference_mode():
        z0 = encode_latent(pipe, to_tensor(fit(image, side)).to(pipe.device),
                           generator=torch.Generator().manual_seed(0))
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1)).to(z0)
        batch = torch.cat([noised(z0, float(s.alphas_cumprod[t]), eps) for s in chosen.values()])
        pixels = decode(pipe, batch)
    st.image([to_image(p, TILE) for p in pixels], caption=names, width=TILE)
