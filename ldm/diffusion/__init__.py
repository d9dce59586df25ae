"""The diffusion process (schedules), parameterisations, samplers and guidance."""
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.samplers import SAMPLERS, get_sampler, invert_ddim, sample
from ldm.diffusion.schedule import Schedule, make_schedule, sd_buffers
from ldm.prediction import parse_prediction_type

__all__ = ["Denoiser", "parse_prediction_type", "classifier_free_guidance", "SAMPLERS",
           "get_sampler", "invert_ddim", "sample", "Schedule", "make_schedule", "sd_buffers"]
