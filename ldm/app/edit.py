"""Page: img2img (strength) and inpainting with an uploaded or rectangle mask."""
from __future__ import annotations

import importlib.util
from typing import Any

import streamlit as st
from PIL import Image, ImageDraw

from ldm.app.common import fit, image_input, pipeline, read_image
from ldm.errors import LdmError
from ldm.inference import SamplingOptions, img2img, inpaint, task_steps
from ldm.inference.sampling import Callback
from ldm.pipeline import Pipeline

# The drawing canvas is an optional component (streamlit-drawable-canvas-fix on PyPI).
CAN_DRAW = importlib.util.find_spec("streamlit_drawable_canvas") is not None
CANVAS = 256  # canvas side in screen pixels


def rectangle_mask(size: tuple[int, int]) -> Image.Image:
    """A white rectangle (the part to repaint) on black, from four sliders in percent."""
    cols = st.columns(2)
    left, right = cols[0].slider("Mask x range (%)", 0, 100, (25, 75), key="mask_x")
    top, bottom = cols[1].slider("Mask y range (%)", 0, 100, (25, 75), key="mask_y")
    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((left * width // 100, top * height // 100,
                                    right * width // 100 - 1, bottom * height // 100 - 1), fill=255)
    return mask


def drawn_mask(image: Image.Image) -> Image.Image | None:
    """A mask painted over the image on a canvas (None until something is drawn)."""
    from streamlit_drawable_canvas import st_canvas
    brush = st.slider("Brush", 4, 60, 24, key="mask_brush")
    result = st_canvas(background_image=image.resize((CANVAS, CANVAS)), drawing_mode="freedraw",
                       stroke_color="#ffffff", stroke_width=brush, fill_color="#ffffff",
                       height=CANVAS, width=CANVAS, update_streamlit=True, key="mask_canvas")
    data = getattr(result, "image_data", None)
    if data is None or not data[..., 3].any():
        return None
    painted = Image.fromarray(((data[..., 3] > 0) * 255).astype("uint8"), mode="L")
    return painted.resize(image.size, Image.Resampling.NEAREST)


def mask_input(image: Image.Image) -> Image.Image:
    """A drawn mask (when the canvas component is installed), an uploaded one (white =
    repaint; resized to the image) or a rectangle."""
    sources = ["Rectangle", "Upload"] + (["Draw"] if CAN_DRAW else [])
    kind = st.radio("Mask", sources, horizontal=True, key="mask_source")
    if kind == "Draw":
        mask = drawn_mask(image)
        if mask is not None:
            return mask
        st.info("Paint the part to repaint; the rectangle is used until then.")
    if kind == "Upload":
        upload = read_image(st.file_uploader("Mask image (white = repaint)", key="mask_upload"))
        if upload is not None:
            return upload.convert("L").resize(image.size, Image.Resampling.NEAREST)
        st.info("Using the rectangle until a readable mask is uploaded.")
    return rectangle_mask(image.size)


def progress_callback(pipe: Pipeline, options: SamplingOptions) -> tuple[Any, Callback]:
    """A progress bar and the sampler callback that advances it."""
    total = max(1, task_steps(pipe, options))
    bar = st.progress(0.0, text="Sampling...")
    return bar, lambda i, x, d: bar.progress(min((i + 1) / total, 1.0),
                                             text=f"Step {i + 1} of {total}")


def run_edit(pipe: Pipeline, kind: str, image: Image.Image, mask: Image.Image,
             options: SamplingOptions) -> Image.Image:
    """One img2img or inpainting result, with progress."""
    bar, callback = progress_callback(pipe, options)
    if kind == "img2img":
        result = img2img(pipe, options, image, callback=callback)[0]
    else:
        result = inpaint(pipe, options, image, mask, callback=callback)[0]
    bar.empty()
    return result


def page() -> None:
    """Draw the page."""
    pipe = pipeline()
    if pipe is None:
        return
    left, right = st.columns(2)
    with left:
        image, text = image_input("edit", default_index=1)
        image = fit(image, pipe.config.autoencoder.resolution)
        kind = st.radio("Edit", ["img2img", "inpaint"], horizontal=True, key="edit_kind")
        mask = mask_input(image) if kind == "inpaint" else None
        prompt = st.text_input("Prompt", "a yellow triangle on a black background",
                               key="edit_prompt")
        cols = st.columns(3)
        strength = cols[0].slider("Strength", 0.05, 1.0, 0.6, 0.05, key="edit_strength",
                                  help="How much of the plan re-runs: 1 starts from noise.")
        steps = int(cols[1].number_input("Steps", 1, 1000, 20, key="edit_steps"))
        seed = int(cols[2].number_input("Seed", 0, 2**31 - 1, 0, key="edit_seed"))
    with right:
        shown = [image] + ([mask] if mask is not None else [])
        st.image(shown, caption=[text or "input"] + (["mask"] if mask is not None else []),
                 width=160)
        if not st.button("Run", type="primary", key="edit_run"):
            return
        if not prompt.strip():
            st.error("Enter a prompt: an empty prompt gives the model nothing to follow.")
            return
        try:
            strength_or_none = strength if kind == "img2img" or strength < 1 else None
            options = SamplingOptions(prompt=prompt, steps=steps, seed=seed, guidance_scale=5.0,
                                      strength=strength_or_none)
            result = run_edit(pipe, kind, image, mask, options)
        except LdmError as err:
            st.error(str(err))
            return
        st.image(result, caption=f"{kind}, strength {strength:g}", width=256)
