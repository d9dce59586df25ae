"""A whole sampling loop captured once as one CUDA graph and replayed (no per-kernel launch cost).

The samplers keep their per-step coefficients on the device and never sync with the host inside
a step, so the loop is capturable. Inputs are copied into static buffers before each replay; the
output buffer belongs to the graph, so callers get a clone.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ldm.diffusion.noise import Generators
    from ldm.pipeline import Pipeline

LoopFn = Callable[..., Tensor]


def to_device(table: Tensor, device: torch.device | str) -> Tensor:
    """A small host table (sampler coefficients, timesteps) moved to `device`.

    While a CUDA graph is being captured a host-to-device copy is refused (unpinned memory) or
    would read a since-freed buffer at replay (pinned), so there the values are written by
    fill kernels whose scalars live in the graph itself.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return table.to(device)
    out = torch.empty(table.shape, dtype=table.dtype, device=device)
    flat = out.view(-1)
    for i, value in enumerate(table.reshape(-1).tolist()):
        flat[i].fill_(value)
    return out


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

    def sample(self, context: Tensor, uncond_context: Tensor | None, x_T: Tensor, steps: int,
               sampler: str, eta: float | None, guidance_scale: float, generator: Generators,
               guidance_rescale: float = 0.0) -> Tensor:
        """Same contract as ldm.generate.sample (without callback), run as one graph replay."""
        from ldm import generate
        from ldm.diffusion.noise import randn
        pipe = self.pipe
        noise = torch.stack([randn(x_T.shape, generator, "cpu", torch.float32)
                             for _ in range(steps)]).to(pipe.device, pipe.dtype)
        options = dict(sampler=sampler, eta=eta, guidance_scale=guidance_scale,
                       guidance_rescale=guidance_rescale)
        inputs = [context.to(pipe.device, pipe.dtype), x_T.to(pipe.device, pipe.dtype), noise]
        if uncond_context is not None:
            inputs.append(uncond_context.to(pipe.device, pipe.dtype))

        def run(c: Tensor, x: Tensor, n: Tensor, u: Tensor | None = None, n_steps: int = steps) -> Tensor:
            return generate.sample(pipe, c, u, x, steps=n_steps, noise=n[:n_steps], **options)

        key = (steps, tuple(tuple(t.shape) for t in inputs), tuple(sorted(options.items())))
        if key not in self.loops:
            warm = lambda *t: run(*t[:3], *t[3:], n_steps=1)  # noqa: E731  (one step warms up)
            self.loops[key] = GraphedLoop(run, *inputs, warmup=warm)
        return self.loops[key](*inputs)
