"""Page: txt2img step by step (x_t and the predicted x_0 after every step) and a guidance sweep."""
from __future__ import annotations

from dataclasses import replace

import streamlit as st
import torch

from ldm.app.common import CLASSIFIER, model_path, pipeline, png_bytes, to_image
from ldm.diffusion.samplers import SAMPLERS, STOCHASTIC_SAMPLERS
from ldm.errors import LdmError
from ldm.inference import (SamplingOptions, encode_prompts, latents_to_images, resolve, run_steps,
                           sample, start_noise, txt2img)
from ldm.inference.conditioning import require_conditioning
from ldm.inference.images import decode
from ldm.models.classifier import ClassifierConfig, load_classifier
from ldm.pipeline import Pipeline

MAX_FRAMES = 10  # decoding every step of a long run would cost more than the run itself
FRAME = 80  # pixels per strip frame: a run of MAX_FRAMES fits one row
DEFAULT_PROMPT = "a red circle on a blue background"


def options_form(pipe: Pipeline) -> SamplingOptions | None:
    """The sampling widgets as validated options (None, with the error shown, when invalid).
    A distilled student gets its own step default and its built-in guidance scale."""
    distilled = pipe.config.diffusion.distilled_guidance
    prompt = st.text_input("Prompt", DEFAULT_PROMPT, key="gen_prompt")
    negative = st.text_input("Negative prompt", "", key="gen_negative", disabled=bool(distilled),
                             help="A distilled student has no unconditional pass to steer away from."
                             if distilled else None)
    cols = st.columns(5)
    sampler = cols[0].selectbox("Sampler", list(SAMPLERS), key="gen_sampler")
    if distilled:  # separate widget keys, so each kind of model keeps its own defaults
        steps = cols[1].number_input("Steps", 1, 1000, 4, key="gen_steps_distilled",
                                     help="A student samples in the steps it was distilled "
                                          "for (the embedded one: 4).")
        guidance = cols[2].slider("Guidance scale", 0.0, 20.0, float(distilled), 0.5,
                                  key="gen_guidance_distilled", disabled=True,
                                  help="Distilled into the student: one pass per step.")
    else:
        steps = cols[1].number_input("Steps", 1, 1000, 20, key="gen_steps")
        guidance = cols[2].slider("Guidance scale", 0.0, 20.0, 7.5, 0.5, key="gen_guidance")
    eta = cols[3].slider("eta", 0.0, 1.0, 0.0, 0.05, key="gen_eta",
                         disabled=sampler not in STOCHASTIC_SAMPLERS,
                         help="Fresh noise per step; only ddim and euler_a take it.")
    seed = cols[4].number_input("Seed", 0, 2**31 - 1, 0, key="gen_seed")
    steering = classifier_form(pipe)
    if not prompt.strip():
        st.error("Enter a prompt: an empty prompt gives the model nothing to follow.")
        return None
    if steering is None:
        return None
    try:
        return SamplingOptions(prompt=prompt, negative_prompt="" if distilled else negative,
                               sampler=sampler, steps=int(steps), guidance_scale=float(guidance),
                               seed=int(seed), eta=float(eta) if sampler in STOCHASTIC_SAMPLERS else None,
                               **steering)
    except LdmError as err:
        st.error(str(err))
        return None


@st.cache_resource(show_spinner=False, max_entries=1)
def _classifier_config(path: str) -> ClassifierConfig:
    return load_classifier(path).config


def classifier_form(pipe: Pipeline) -> dict[str, object] | None:
    """Classifier guidance toward the chosen classes: the options it adds ({} when off), or
    None (with the reason shown) when the choice cannot run."""
    with st.expander("Classifier guidance"):
        scale = st.slider("Classifier scale s", 0.0, 30.0, 0.0, 0.5, key="gen_classifier_scale",
                          help="eps - s sqrt(1 - abar_t) grad log p(class | x_t); 0 is off. "
                               "The embedded classifier reads the embedded models' latents.")
        config = _classifier_config(str(CLASSIFIER))
        if config.in_channels != pipe.latent_channels:
            st.caption(f"The embedded classifier reads {config.in_channels}-channel latents, "
                       f"this model's have {pipe.latent_channels}: not available.")
            return {}
        labels = config.labels
        cols = st.columns(len(labels))
        picked = {name: cols[k].selectbox(name, ["any", *classes], key=f"gen_class_{name}")
                  for k, (name, classes) in enumerate(labels.items())}
    spec = ",".join(f"{name}={value}" for name, value in picked.items() if value != "any")
    if scale == 0:
        return {}
    if not spec:
        st.error("Classifier guidance: choose at least one class to steer toward.")
        return None
    return {"classifier": str(CLASSIFIER), "classifier_labels": spec, "classifier_scale": float(scale)}


def trajectory(pipe: Pipeline, options: SamplingOptions) -> dict:
    """Run one image, filling the x_t / predicted-x_0 strip as the sampler's callback fires."""
    require_conditioning(pipe, "crossattn")  # inpainting / upscaling models need their inputs
    options = resolve(options, pipe)
    total = run_steps(pipe, options)
    stride = max(1, -(-total // MAX_FRAMES))
    bar = st.progress(0.0, text="Sampling...")
    strip_x, strip_x0 = st.empty(), st.empty()
    frames: dict[str, list] = {"x": [], "x0": [], "captions": []}

    def callback(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        bar.progress((i + 1) / total, text=f"Step {i + 1} of {total}")
        if i % stride and i != total - 1:
            return
        images = [to_image(p, FRAME) for p in decode(pipe, torch.cat([x[:1], denoised[:1]]))]
        frames["x"].append(images[0])
        frames["x0"].append(images[1])
        frames["captions"].append(f"step {i + 1}")
        strip_x.image(frames["x"], caption=frames["captions"], width=FRAME)
        strip_x0.image(frames["x0"], caption=frames["captions"], width=FRAME)

    context, uncond = encode_prompts(pipe, options)
    x_T, generators = start_noise(pipe, options)
    latents = sample(pipe, context, uncond, x_T, options, generator=generators, callback=callback)
    bar.empty()
    strip_x.empty()  # the finished strips are drawn once more, with the result, below
    strip_x0.empty()
    image = latents_to_images(pipe, latents, options.vae_tile)[0]
    return {**frames, "image": image, "options": options}


def parameters(options: SamplingOptions, model: str) -> dict[str, object]:
    """What made an image, for the PNG's text chunk."""
    return {"prompt": options.prompt, "negative_prompt": options.negative_prompt,
            "sampler": options.sampler, "steps": options.steps, "eta": options.eta,
            "guidance_scale": options.guidance_scale, "seed": options.seed,
            "size": f"{options.width}x{options.height}", "model": model,
            **({"classifier": options.classifier_labels, "classifier_scale": options.classifier_scale}
               if options.classifier else {})}


def show_result(result: dict) -> None:
    """The strips, the final image and its download."""
    st.markdown("**x_t after each step** (top) and **predicted x_0** (bottom)")
    st.image(result["x"], caption=result["captions"], width=FRAME)
    st.image(result["x0"], caption=result["captions"], width=FRAME)
    st.image(result["image"], caption="final image", width=256)
    model = model_path()
    st.download_button("Download PNG (with parameters)",
                       png_bytes(result["image"], parameters(result["options"], model)),
                       file_name=f"ldm_{result['options'].seed}.png", mime="image/png",
                       key="gen_download")


def guidance_sweep(pipe: Pipeline, options: SamplingOptions) -> None:
    """The same seed and prompt at several guidance scales."""
    if pipe.config.diffusion.distilled_guidance:
        st.caption("This model has its guidance scale distilled in: there is nothing to sweep.")
        return
    text = st.text_input("Guidance scales", "1, 3, 7.5, 12", key="sweep_scales")
    if not st.button("Run sweep", key="sweep_run"):
        return
    try:
        scales = [float(v) for v in text.replace(" ", "").split(",") if v]
        runs = [replace(options, guidance_scale=s) for s in scales]
    except (ValueError, LdmError) as err:
        st.error(f"Guidance scales must be numbers in 0..100 separated by commas ({err})")
        return
    bar = st.progress(0.0, text="Sweeping guidance...")
    images = []
    for k, run in enumerate(runs):
        images += txt2img(pipe, run)
        bar.progress((k + 1) / len(runs), text=f"Scale {scales[k]:g} done")
    bar.empty()
    st.image(images, caption=[f"guidance {s:g}" for s in scales], width=160)


def page() -> None:
    """Draw the page."""
    pipe = pipeline()
    if pipe is None:
        return
    options = options_form(pipe)
    if options is None:
        return
    if st.button("Generate", type="primary", key="gen_run"):
        try:
            st.session_state["gen_result"] = trajectory(pipe, options)
        except LdmError as err:
            st.error(str(err))
    if "gen_result" in st.session_state:
        show_result(st.session_state["gen_result"])
    st.subheader("Guidance-scale sweep")
    guidance_sweep(pipe, options)
