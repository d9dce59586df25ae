"""The whole sampling loop captured as one CUDA graph equals the eager loop (GPU only), and the
graph path's host-side pieces behave on the CPU."""
from __future__ import annotations

import pytest
import torch

from ldm.diffusion.noise import randn, seeded_generators
from ldm.diffusion.tables import to_device
from ldm.inference import SamplingOptions, sample
from ldm.inference.cuda_graph import SamplingGraphs
from ldm.pipeline import Pipeline
from conftest import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_pipe(device: str) -> Pipeline:
    config = tiny_config(text_layers=1)
    pipe = Pipeline.from_config(config, device=device, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # undo the zero-init of output convs so the output depends on x
        for p in pipe.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.device))
    return pipe


def test_to_device_off_capture_is_a_plain_copy() -> None:
    table = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    out = to_device(table, "cpu")
    assert torch.equal(out, table) and out.dtype == torch.float64


def test_graphs_refuse_a_cpu_pipeline() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        SamplingGraphs(tiny_pipe("cpu"))


@cuda
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("euler_a", None), ("dpmpp_2m", None),
                                         ("plms", None)])
def test_captured_loop_matches_eager_and_replays(sampler: str, eta: float | None) -> None:
    pipe = tiny_pipe("cuda")
    steps, shape = 6, (2, 4, 16, 16)
    with torch.inference_mode():
        context = pipe.encode_prompt(["a red circle", "a blue square"])
        uncond = pipe.encode_prompt(["", ""])
    graphs = SamplingGraphs(pipe)
    for seed in (0, 7):  # the second batch replays the graph captured for the first
        x_T = randn(shape, seeded_generators(seed, 2), "cuda")
        noise_gens = seeded_generators(seed + 100, 2)
        options = SamplingOptions(steps=steps, sampler=sampler, eta=eta, guidance_scale=4.0)
        graphed = graphs.sample(context, uncond, x_T, options, noise_gens)
        # eager with the same up-front noise the graph path draws
        noise = torch.stack([randn(shape, g, "cpu") for g in [seeded_generators(seed + 100, 2)]
                             for _ in range(steps)]).cuda()
        eager = sample(pipe, context, uncond, x_T, options, noise=noise)
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    assert len(graphs.loops) == 1
