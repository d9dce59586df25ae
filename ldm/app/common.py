"""What several pages share: the model chosen in the sidebar, input images, figures, PNG export."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import streamlit as st
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

import ldm
from ldm.data.shapes import ShapesDataset, caption
from ldm.pipeline import Pipeline

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "shapes.safetensors"
# The embedded models the sidebar offers: the default model and its distilled 4-step student.
EMBEDDED = {"default model": DEFAULT_MODEL,
            "4-step student": DEFAULT_MODEL.with_name("shapes_4step.safetensors")}
CLASSIFIER = DEFAULT_MODEL.with_name("shapes_classifier.safetensors")
SHAPES_SEED = 7  # a fixed shapes set, so "sample 3" is the same picture on every page and run


def device() -> str:
    """The accelerator when there is one: the app's models are small enough for either."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def _load(path: str, config: str | None, device_name: str) -> Pipeline:
    return ldm.load_pipeline(path, config or None, device=device_name)


def model_path() -> str:
    """The checkpoint in use: the path typed in the sidebar, else the embedded model chosen."""
    typed = st.session_state.get("model_path")
    return typed or str(EMBEDDED.get(st.session_state.get("model_embedded"), DEFAULT_MODEL))


def pipeline() -> Pipeline | None:
    """The sidebar's model, loaded once per (path, config); None (and an error shown) when it
    cannot be loaded."""
    path = model_path()
    config = st.session_state.get("model_config") or None
    try:
        return _load(path, config, device())
    except Exception as err:  # noqa: BLE001 - any file the user names may fail in its own way
        st.error(f"Could not load the model {path}: {err}")
        return None


def model_sidebar() -> None:
    """Checkpoint path and optional config (our YAML, SD's inference YAML or a preset name)."""
    with st.sidebar.expander("Model", expanded=False):
        st.radio("Embedded model", list(EMBEDDED), key="model_embedded",
                 help="The default model samples with any sampler and step count; its "
                      "distilled student draws the same in 4 steps, guidance built in.")
        st.text_input("Checkpoint (.safetensors / .ckpt)", key="model_path",
                      placeholder=str(DEFAULT_MODEL),
                      help="Ours or SD 1.x / 2.x; empty for the embedded model chosen above.")
        st.text_input("Config (optional)", key="model_config",
                      help="Our YAML, SD's inference YAML, or a preset name such as sd2-v.")
        st.caption(f"Device: {device()}")


def shapes_sample(index: int, size: int = 64) -> tuple[Image.Image, str]:
    """Item `index` of a fixed shapes set, with its canonical caption."""
    data = ShapesDataset(max(index + 1, 1), seed=SHAPES_SEED, size=size, paraphrase=False)
    spec, _ = data.spec(index)
    pixels = ((data[index]["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy()), caption(spec)


def read_image(upload: io.BytesIO | None) -> Image.Image | None:
    """An uploaded file as RGB, or None with an error shown when it is not a readable image."""
    if upload is None:
        return None
    try:
        with Image.open(upload) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        st.error(f"{getattr(upload, 'name', 'the upload')} is not a readable image ({err})")
        return None


def image_input(key: str, default_index: int = 0) -> tuple[Image.Image, str]:
    """A shapes sample or an uploaded image (the shapes sample when the upload is unreadable)."""
    source = st.radio("Image", ["Shapes sample", "Upload"], horizontal=True, key=f"{key}_source")
    if source == "Upload":
        image = read_image(st.file_uploader("Image file", type=None, key=f"{key}_upload"))
        if image is not None:
            return image, ""
        st.info("Showing a shapes sample until a readable image is uploaded.")
    index = st.number_input("Shapes sample", 0, 999, default_index, key=f"{key}_index")
    return shapes_sample(int(index))


def fit(image: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize to side x side."""
    width, height = image.size
    short = min(width, height)
    box = ((width - short) // 2, (height - short) // 2, (width + short) // 2, (height + short) // 2)
    return image.crop(box).resize((side, side), Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(image.height, image.width, 3).permute(2, 0, 1).float()
    return (pixels / 127.5 - 1)[None]


def to_image(pixels: torch.Tensor, side: int | None = None) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image (nearest-upscaled to `side` for small previews)."""
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    image = Image.fromarray(array.permute(1, 2, 0).numpy())
    return image.resize((side, side), Image.Resampling.NEAREST) if side else image


def png_bytes(image: Image.Image, parameters: dict[str, object] | None = None) -> bytes:
    """PNG file bytes carrying `parameters` as a text chunk (what made the image)."""
    info = PngImagePlugin.PngInfo()
    for name, value in (parameters or {}).items():
        info.add_text(name, str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run tiny networks on `count` threads: at these sizes more threads mostly wait on each
    other (a 32-channel U-Net step measured 10x slower on two busy cores than on one)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
