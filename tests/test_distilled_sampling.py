"""Models whose config says how they were distilled: the trailing timestep grid, guidance
trained in (one conditional pass per step), checked once in resolve."""
from __future__ import annotations

import pytest
from conftest import tiny_pipeline

from ldm.errors import SamplingError
from ldm.inference import SamplingOptions, resolve, txt2img


@pytest.fixture(scope="module")
def student():
    pipe = tiny_pipeline()
    pipe.config.diffusion.prediction_type = "v"
    pipe.config.diffusion.timestep_spacing = "trailing"
    pipe.config.diffusion.distilled_guidance = 7.5
    return pipe


def recorded_calls(pipe) -> tuple[list[tuple[int, list[int]]], object]:
    """(batch, timesteps) of every U-Net call, and the hook's handle to remove."""
    calls: list[tuple[int, list[int]]] = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], args[1].tolist())))
    return calls, handle


def test_student_runs_its_grid_with_one_pass_per_step(student) -> None:
    calls, handle = recorded_calls(student)
    try:
        txt2img(student, SamplingOptions(prompt="a red circle", steps=4, seed=0))
    finally:
        handle.remove()
    # trailing grid for 4 of 1000 steps; batch 1: no unconditional half
    assert calls == [(1, [999]), (1, [749]), (1, [499]), (1, [249])]


def test_guidance_scale_of_a_distilled_model(student) -> None:
    assert resolve(SamplingOptions(prompt="x"), student).guidance_scale == 1.0  # 7.5: the default
    assert resolve(SamplingOptions(prompt="x", guidance_scale=1), student).guidance_scale == 1.0
    with pytest.raises(SamplingError, match="distilled in; guidance scale must be 7.5"):
        resolve(SamplingOptions(prompt="x", guidance_scale=3), student)


def test_sigma_samplers_refuse_another_grid(student) -> None:
    with pytest.raises(SamplingError, match="trailing.*euler.*walks its own sigmas"):
        resolve(SamplingOptions(prompt="x", sampler="euler"), student)


def test_plain_models_keep_sd_uniform_grid_and_guidance() -> None:
    pipe = tiny_pipeline()
    calls, handle = recorded_calls(pipe)
    try:
        txt2img(pipe, SamplingOptions(prompt="a red circle", steps=4, seed=0))
    finally:
        handle.remove()
    assert calls == [(2, [751] * 2), (2, [501] * 2), (2, [251] * 2), (2, [1] * 2)]
