"""The diffusion process (schedules), parameterisations, samplers and guidance."""
from ldm.diffusion.denoiser import Denoiser, parse_prediction_type
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.samplers import SAMPLERS, get_sampler, invert_ddim, sample
from ldm.diffusion.schedule import Schedule, make_schedule, sd_buffers

__all__ = ["Denoiser", "parse_prediction_type", "classifier_free_guidance", "SAMPLERS",
           "get_sampler", "invert_ddim", "sample", "Schedule", "make_schedule", "sd_buffers"]
