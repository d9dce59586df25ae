"""The app's frame: page choice and model in the sidebar, then the chosen page."""
from __future__ import annotations

import streamlit as st

from ldm.app import edit, forward, generate, latent, score, train
from ldm.app.common import model_sidebar

PAGES = {
    "Forward process": forward.page,
    "Generation": generate.page,
    "Latent space": latent.page,
    "Score view": score.page,
    "Train a tiny denoiser": train.page,
    "Editing": edit.page,
}


def run() -> None:
    """Draw the sidebar and the selected page."""
    st.set_page_config(page_title="ldm: diffusion at work", layout="wide")
    st.sidebar.title("ldm")
    name = st.sidebar.radio("Page", list(PAGES), key="page")
    model_sidebar()
    st.title(name)
    PAGES[name]()
