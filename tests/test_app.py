"""The Streamlit app, run headless by streamlit.testing: every page draws, widgets drive it."""
from __future__ import annotations

import io

import pytest
from conftest import ROOT
from PIL import Image

pytest.importorskip("streamlit", reason="the app's extra: pip install -e .[app]")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = ROOT / "scripts" / "app.py"
# Streamlit's own chart code calls a pandas API that pandas 3 deprecates; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")
TIMEOUT = 600  # the first run loads the embedded model; a busy CI machine is slow at it


def open_page(name: str) -> AppTest:
    """The app, switched to page `name`, after a run without exceptions."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.sidebar.radio(key="page").set_value(name)
    at.run()
    assert_clean(at)
    assert at.title[0].value == name
    return at


def assert_clean(at: AppTest) -> None:
    """No exception and no error element."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def image_count(at: AppTest) -> int:
    """Pictures drawn anywhere on the page (st.image and matplotlib figures)."""
    return sum(len(element.value) for element in at.image)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_forward_process_t_slider_and_zero_snr() -> None:
    at = open_page("Forward process")
    before = image_count(at)
    assert before >= 1 + 3 + 3 + 1  # input, pixel row, latent row, schedule plots
    at.slider(key="forward_t").set_value(900).run()
    assert_clean(at)
    at.checkbox(key="forward_zero_snr").check().run()
    assert_clean(at)
    assert image_count(at) == before + 6  # each row gains the three zero-SNR schedules


def test_forward_process_corrupt_upload_is_an_error_not_a_crash() -> None:
    at = open_page("Forward process")
    at.radio(key="forward_source").set_value("Upload").run()
    at.file_uploader(key="forward_upload").set_value(("broken.png", b"not an image", "image/png"))
    at.run()
    assert not at.exception
    assert any("not a readable image" in e.value for e in at.error)
    assert image_count(at) > 0  # the page still draws, on a shapes sample


def test_generation_three_steps_fills_the_strips() -> None:
    at = open_page("Generation")
    at.selectbox(key="gen_sampler").set_value("euler")
    at.number_input(key="gen_steps").set_value(3)
    at.button(key="gen_run").click().run()
    assert_clean(at)
    strips = [e for e in at.image if len(e.value) == 3]
    assert len(strips) == 2  # x_t and predicted x_0, one frame per step
    assert at.get("download_button")


def test_generation_empty_prompt_is_an_error() -> None:
    at = open_page("Generation")
    at.text_input(key="gen_prompt").set_value("   ").run()
    assert not at.exception
    assert any("prompt" in e.value for e in at.error)


def test_guidance_sweep_grid() -> None:
    at = open_page("Generation")
    at.number_input(key="gen_steps").set_value(2)
    at.text_input(key="sweep_scales").set_value("1, 7.5")
    at.button(key="sweep_run").click().run()
    assert_clean(at)
    assert any(len(e.value) == 2 for e in at.image)
    at.text_input(key="sweep_scales").set_value("1, lots")
    at.button(key="sweep_run").click().run()
    assert any("Guidance scales" in e.value for e in at.error)


def test_generation_with_classifier_guidance() -> None:
    at = open_page("Generation")
    at.number_input(key="gen_steps").set_value(2)
    at.slider(key="gen_classifier_scale").set_value(3.0).run()
    assert any("at least one class" in e.value for e in at.error)  # a scale, but no class
    at.selectbox(key="gen_class_color").set_value("red")
    at.selectbox(key="gen_class_bg").set_value("blue").run()
    at.button(key="gen_run").click().run()
    assert_clean(at)
    assert [e for e in at.image if e.captions == ["final image"]]
    assert at.session_state["gen_result"]["options"].classifier_labels == "color=red,bg=blue"


def test_the_embedded_student_samples_in_its_own_steps() -> None:
    at = open_page("Generation")
    at.sidebar.radio(key="model_embedded").set_value("4-step student").run()
    assert_clean(at)
    assert at.number_input(key="gen_steps_distilled").value == 4
    assert at.slider(key="gen_guidance_distilled").disabled
    at.button(key="gen_run").click().run()
    assert_clean(at)
    assert sum(len(e.value) == 4 for e in at.image) == 2  # x_t and x_0 strips, a frame per step
    assert any("nothing to sweep" in c.value for c in at.caption)


def test_latent_space_reconstruction_and_interpolation() -> None:
    at = open_page("Latent space")
    assert any(m.label == "Scale factor" for m in at.metric)
    at.number_input(key="interp_frames").set_value(3)
    at.number_input(key="interp_steps").set_value(2)
    at.button(key="interp_run").click().run()
    assert_clean(at)
    assert any(len(e.value) == 3 for e in at.image)
    at.radio(key="interp_mode").set_value("Prompts (seed A)")
    at.button(key="interp_run").click().run()
    assert_clean(at)


def test_score_view_t_and_sampler() -> None:
    at = open_page("Score view")
    assert image_count(at) == 2
    at.slider(key="score_t").set_value(600)
    at.radio(key="score_sampler").set_value("ddpm")
    at.number_input(key="score_steps").set_value(5).run()
    assert_clean(at)
    assert image_count(at) == 2


def test_train_toy_runs_to_its_target_resets_and_stops() -> None:
    at = open_page("Train a tiny denoiser")
    at.number_input(key="train_target").set_value(20)
    at.button(key="train_start").click().run()
    assert_clean(at)
    assert len(at.session_state["trainer"].losses) == 20
    assert at.session_state["train_samples"] is not None
    at.button(key="train_reset").click().run()
    assert not at.session_state["trainer"].losses
    at.session_state["training"] = True  # as in the middle of a run
    at.button(key="train_stop").click().run()
    assert_clean(at)
    assert not at.session_state["training"]
    assert not at.session_state["trainer"].losses  # Stop acts before the next slice


def test_editing_img2img_and_inpaint_with_uploaded_mask() -> None:
    at = open_page("Editing")
    at.number_input(key="edit_steps").set_value(3)
    at.slider(key="edit_strength").set_value(0.7)
    at.button(key="edit_run").click().run()
    assert_clean(at)
    assert any("img2img" in caption for e in at.image for caption in e.captions)
    at.radio(key="edit_kind").set_value("inpaint").run()
    at.radio(key="mask_source").set_value("Upload").run()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    at.file_uploader(key="mask_upload").set_value(("mask.png", png(mask), "image/png"))
    at.button(key="edit_run").click().run()
    assert_clean(at)
    assert any("inpaint" in caption for e in at.image for caption in e.captions)


def test_a_checkpoint_that_fails_to_load_leaves_the_app_usable(tmp_path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    at = open_page("Latent space")
    at.sidebar.text_input(key="model_path").set_value(str(bad)).run()
    assert not at.exception
    assert any("Could not load" in e.value for e in at.error)
    at.sidebar.text_input(key="model_path").set_value("").run()
    assert_clean(at)


def test_another_checkpoint_chosen_in_the_sidebar_generates(tmp_path) -> None:
    from conftest import tiny_config

    from ldm.pipeline import Pipeline
    path = tmp_path / "tiny.safetensors"
    Pipeline.from_config(tiny_config()).save(path)
    at = open_page("Generation")
    at.sidebar.text_input(key="model_path").set_value(str(path)).run()
    assert_clean(at)
    at.number_input(key="gen_steps").set_value(2)
    at.button(key="gen_run").click().run()
    assert_clean(at)
    final = [e for e in at.image if e.captions == ["final image"]]
    assert final


def test_editing_draw_mask_waits_for_a_drawing() -> None:
    pytest.importorskip("streamlit_drawable_canvas", reason="the drawing canvas is optional")
    at = open_page("Editing")
    at.radio(key="edit_kind").set_value("inpaint").run()
    at.radio(key="mask_source").set_value("Draw").run()
    assert_clean(at)
    assert any("rectangle is used until then" in info.value for info in at.info)
    assert any(e.captions == ["input", "mask"] or "mask" in e.captions for e in at.image)
