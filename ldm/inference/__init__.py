"""The front door for sampling: one options object, one sampling core, thin task functions."""
from ldm.inference.images import decode, latents_to_images, to_pil
from ldm.inference.img2img import img2img
from ldm.inference.inpaint import inpaint, outpaint
from ldm.inference.options import SamplingOptions, default_image_size, resolve
from ldm.inference.setup import default_precision, load_pipeline, prepare_pipeline
from ldm.inference.sampling import (encode_prompts, make_denoiser, run_steps, sample, start_noise,
                                    task_steps)
from ldm.inference.txt2img import txt2img
from ldm.inference.upscale import upscale

__all__ = ["load_pipeline", "prepare_pipeline", "default_precision", "SamplingOptions", "resolve",
           "default_image_size", "sample", "txt2img", "img2img", "inpaint", "outpaint", "upscale", "encode_prompts", "start_noise", "make_denoiser",
           "run_steps", "task_steps", "decode", "latents_to_images", "to_pil"]
