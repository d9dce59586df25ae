"""The front door for sampling: one options object, one sampling core, thin task functions."""
from ldm.inference.images import decode, latents_to_images, to_pil
from ldm.inference.options import SamplingOptions, default_image_size, resolve
from ldm.inference.sampling import encode_prompts, make_denoiser, sample, start_noise, txt2img

__all__ = ["SamplingOptions", "resolve", "default_image_size", "sample", "txt2img",
           "encode_prompts", "start_noise", "make_denoiser", "decode", "latents_to_images", "to_pil"]
