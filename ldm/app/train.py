"""Page: train a tiny denoiser live, a slice of steps per rerun, stoppable between slices."""
from __future__ import annotations

import time

import matplotlib.pyplot as plt
import streamlit as st
import torch

from ldm.app.common import to_image
from ldm.app.trainers import TRAINERS, ShapesTrainer, ToyTrainer

SLICE_SECONDS = 1.0  # work per rerun: short enough for Stop to take effect promptly
SAMPLE_EVERY = 50    # optimiser steps between refreshed samples


def smoothed(values: list[float], decay: float = 0.95) -> list[float]:
    """Exponential moving average (the per-batch loss is noisy: t is drawn per example)."""
    out, average = [], values[0]
    for value in values:
        average = decay * average + (1 - decay) * value
        out.append(average)
    return out


def show_samples(trainer: ToyTrainer | ShapesTrainer) -> None:
    """The latest samples (scatter for the toy, images for shapes)."""
    samples = st.session_state.get("train_samples")
    if samples is None:
        return
    if isinstance(trainer, ToyTrainer):
        fig, ax = plt.subplots(figsize=(4, 4))
        data = trainer.data.sample(1000, torch.Generator().manual_seed(0))
        ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.3, color="tab:gray", label="data")
        ax.scatter(samples[:, 0], samples[:, 1], s=3, color="tab:blue", label="samples")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.legend(fontsize=7)
        st.columns(2)[0].pyplot(fig)
        plt.close(fig)
    else:
        st.image([to_image(x, 64) for x in samples], width=64)
    st.caption(f"Samples after {st.session_state.get('train_sampled_at', 0)} steps (DDIM)")


def page() -> None:
    """Draw the page."""
    state = st.session_state
    cols = st.columns([2, 1, 1])
    kind = cols[0].selectbox("What to train", list(TRAINERS), key="train_kind")
    target = int(cols[1].number_input("Steps", 10, 5000, 300, 10, key="train_target"))
    cols[2].caption("CPU, one thread")
    buttons = st.columns(3)
    start = buttons[0].button("Start / continue", type="primary", key="train_start")
    stop = buttons[1].button("Stop", key="train_stop")
    reset = buttons[2].button("Reset", key="train_reset")
    trainer = state.get("trainer")
    if reset or not isinstance(trainer, TRAINERS[kind]):
        with st.spinner("Preparing..."):
            trainer = state["trainer"] = TRAINERS[kind]()
        state["training"], state["train_samples"], state["train_sampled_at"] = False, None, 0
    if start:
        state["training"] = len(trainer.losses) < target
    if stop:
        state["training"] = False
    bar = st.progress(0.0)
    if state.get("training"):
        deadline = time.monotonic() + SLICE_SECONDS
        while time.monotonic() < deadline and len(trainer.losses) < target:
            trainer.step(min(10, target - len(trainer.losses)))
        finished = len(trainer.losses) >= target
        last = state.get("train_sampled_at", 0)
        if finished or len(trainer.losses) - last >= SAMPLE_EVERY or state["train_samples"] is None:
            state["train_samples"] = trainer.samples()
            state["train_sampled_at"] = len(trainer.losses)
        state["training"] = not finished
    done = len(trainer.losses)
    bar.progress(min(done / target, 1.0), text=f"{done} / {target} steps")
    if trainer.losses:
        st.line_chart({"loss": trainer.losses, "smoothed": smoothed(trainer.losses)}, height=220)
    show_samples(trainer)
    if state.get("training"):
        st.rerun()
