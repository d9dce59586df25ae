"""Page: score fields on a 2-D Gaussian mixture (learned vs exact) and sampler paths over them."""
from __future__ import annotations

import matplotlib.pyplot as plt
import streamlit as st
import torch

from ldm.app.toy import learned_score, sample_paths
from ldm.app.trainers import ToyTrainer

PRETRAIN_STEPS = 800
LIMIT = 2.5  # the plotted square [-LIMIT, LIMIT]^2 holds the data and most of the noise


@st.cache_resource(show_spinner=f"Training the toy MLP ({PRETRAIN_STEPS} steps)...")
def pretrained_toy() -> ToyTrainer:
    """A toy denoiser trained once per app process."""
    trainer = ToyTrainer()
    trainer.step(PRETRAIN_STEPS)
    return trainer


def field_plot(trainer: ToyTrainer, t: int, density: int) -> plt.Figure:
    """Learned and exact score arrows over a grid, on top of samples of q(x_t)."""
    mixture, schedule = trainer.data, trainer.schedule
    abar = float(schedule.alphas_cumprod[t])
    axis = torch.linspace(-LIMIT, LIMIT, density)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    generator = torch.Generator().manual_seed(0)
    x0 = mixture.sample(2000, generator)
    x_t = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * torch.randn(x0.shape, generator=generator)
    fields = {"learned: -eps_theta(x, t) / sqrt(1 - alpha_bar_t)": learned_score(
        trainer.model, grid, t, schedule), "exact: grad log q_t(x)": mixture.score(grid, abar)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, (title, score) in zip(axes, fields.items()):
        ax.scatter(x_t[:, 0], x_t[:, 1], s=2, alpha=0.25, color="tab:gray")
        # Arrows share one length scale per panel, set by the largest (the score grows as 1/s).
        ax.quiver(grid[:, 0], grid[:, 1], score[:, 0], score[:, 1], color="tab:blue",
                  angles="xy", scale_units="xy", scale=float(score.norm(dim=1).max()) * 4 / LIMIT)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
    fig.suptitle(f"t = {t}, alpha_bar_t = {abar:.4f}")
    fig.tight_layout()
    return fig


def paths_plot(trainer: ToyTrainer, sampler: str, steps: int, count: int) -> plt.Figure:
    """Sampler trajectories from x_T to x_0 as lines, ending dots on the data."""
    paths = sample_paths(trainer.model, trainer.schedule, sampler, steps, count, seed=2)
    fig, ax = plt.subplots(figsize=(5, 5))
    data = trainer.data.sample(2000, torch.Generator().manual_seed(0))
    ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.2, color="tab:gray", label="data")
    for k in range(count):
        ax.plot(paths[:, k, 0], paths[:, k, 1], linewidth=0.8, alpha=0.8)
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=10, color="black", zorder=3, label="x_0")
    ax.scatter(paths[0, :, 0], paths[0, :, 1], s=6, color="tab:red", zorder=3, label="x_T")
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{sampler}, {steps} steps")
    fig.tight_layout()
    return fig


def page() -> None:
    """Draw the page."""
    st.caption("A mixture of three Gaussians noised by the VP process: the exact score of q_t "
               "is a responsibility-weighted sum of Gaussian scores; the MLP learns "
               "eps_theta, and score = -eps_theta / sqrt(1 - alpha_bar_t).")
    own = st.session_state.get("trainer")
    use_own = isinstance(own, ToyTrainer) and st.checkbox(
        "Use the model trained on the Train page", key="score_use_own")
    with st.spinner("Preparing the toy model..."):
        trainer = own if use_own else pretrained_toy()
    cols = st.columns(2)
    t = cols[0].slider("t", 0, trainer.schedule.num_timesteps - 1, 100, key="score_t")
    density = cols[1].slider("Arrows per side", 8, 32, 17, key="score_density")
    st.pyplot(field_plot(trainer, t, density))
    st.subheader("Sample paths")
    cols = st.columns(3)
    sampler = cols[0].radio("Sampler", ["ddim", "ddpm"], horizontal=True, key="score_sampler")
    steps = int(cols[1].number_input("Steps", 2, 1000, 50, key="score_steps"))
    count = int(cols[2].number_input("Paths", 1, 200, 40, key="score_paths"))
    with st.spinner("Sampling..."):
        st.columns(2)[0].pyplot(paths_plot(trainer, sampler, steps, count))
    plt.close("all")
