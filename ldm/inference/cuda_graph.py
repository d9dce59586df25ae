"""A whole sampling loop captured once as one CUDA graph and replayed (no per-kernel launch cost).

The samplers keep their per-step coefficients on the device and never sync with the host inside
a step, so the loop is capturable. Inputs are copied into static buffers before each replay; the
output buffer belongs to the graph, so callers get a clone.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldm.inference.options import SamplingOptions
from ldm.inference.sampling import run_steps, sample

if TYPE_CHECKING:
    from ldm.diffusion.noise import Generators
    from ldm.pipeline import Pipeline

LoopFn = Callable[..., Tensor]


class GraphedLoop:
    """`fn(*tensors)` captured as a CUDA graph for fixed shapes; call it like `fn`."""

    def __init__(self, fn: LoopFn, *examples: Tensor, warmup: LoopFn | None = None) -> None:
        if not all(t.is_cuda for t in examples):
            raise ValueError("CUDA graph capture needs every input on a CUDA device")
        self.static_inputs = [t.clone() for t in examples]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS, autotuning) before capture
            (warmup or fn)(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} tensors, got {len(inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            if new.shape != static.shape:
                raise ValueError(f"captured for shape {list(static.shape)}, got {list(new.shape)}")
            static.copy_(new)
        self.graph.replay()
        return self.static_output.clone()


class SamplingGraphs:
    """Captured sampling loops of a pipeline, reused across batches of the same shape.

    Owned by the caller (e.g. txt2img for one run), so no graph outlives its user. Every step's
    noise is drawn up front from the per-image generators and fed to the graph as an input:
    seeds reproduce in graph mode, though stochastic samplers need not match eager bit for bit.
    """

    def __init__(self, pipe: "Pipeline") -> None:
        if pipe.device.type != "cuda":
            raise ValueError("CUDA graphs need the pipeline on a CUDA device")
        self.pipe = pipe
        self.loops: dict[tuple, GraphedLoop] = {}

    def sample(self, context: Tensor, uncond_context: Tensor | None, x_T: Tensor,
               options: SamplingOptions, generator: Generators) -> Tensor:
        """Same contract as ldm.inference.sample (without callback), run as one graph replay."""
        from ldm.diffusion.noise import randn
        pipe, steps = self.pipe, options.steps
        noise = torch.stack([randn(x_T.shape, generator, "cpu", torch.float32)
                             for _ in range(run_steps(pipe, options))]).to(pipe.device, pipe.dtype)
        inputs = [context.to(pipe.device, pipe.dtype), x_T.to(pipe.device, pipe.dtype), noise]
        if uncond_context is not None:
            inputs.append(uncond_context.to(pipe.device, pipe.dtype))

        def run(c: Tensor, x: Tensor, n: Tensor, u: Tensor | None = None,
                run_options: SamplingOptions = options) -> Tensor:
            return sample(pipe, c, u, x, run_options, noise=n[:run_steps(pipe, run_options)])

        sampling = (options.sampler, options.eta, options.guidance_scale, options.guidance_rescale)
        key = (steps, tuple(tuple(t.shape) for t in inputs), sampling)
        if key not in self.loops:
            one_step = replace(options, steps=1)
            warm = lambda *t: run(*t[:3], *t[3:], run_options=one_step)  # noqa: E731  (warms up)
            self.loops[key] = GraphedLoop(run, *inputs, warmup=warm)
        return self.loops[key](*inputs)
