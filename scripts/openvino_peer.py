"""OpenVINO as a benchmark peer: a diffusers module converted with openvino.convert_model and
compiled for the CPU with static shapes, a precision hint and a fixed thread count.

Benchmark-only (requirements-bench.txt): the project's own OpenVINO backend
(ldm/inference/openvino_backend.py, whose availability check and compilation this shares)
converts our modules, this diffusers'. Imported by scripts/bench_models.py and
scripts/bench_txt2img.py from this folder.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ldm.inference.openvino_backend import available, compile_request, hint

__all__ = ["available", "convert", "compile_for", "patch_pipeline"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _SampleOnly(nn.Module):
    """A diffusers model whose forward returns the plain tensor (tracing needs tensors out)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args: Tensor) -> Tensor:
        if self.method == "unet":
            x, t, context = args
            return self.model(x, t, encoder_hidden_states=context).sample
        return self.model.decode(args[0]).sample


def convert(model: nn.Module, net: str, example: tuple[Tensor, ...]) -> "object":
    """The module as an openvino.Model with static input shapes (`net`: "unet" or "vae")."""
    import openvino as ov
    with torch.inference_mode(False), torch.no_grad():
        converted = ov.convert_model(_SampleOnly(model, net).eval(), example_input=example)
    converted.reshape({port: ov.PartialShape(list(t.shape))
                       for port, t in zip(converted.inputs, example)})
    return converted


def compile_for(converted: "object", precision: str, threads: int) -> Callable[..., Tensor]:
    """call(*tensors) -> fp32 tensor, compiled for the CPU with the precision hint."""
    request = compile_request(converted, hint(PRECISIONS[precision]), threads, cache=None)

    def call(*tensors: Tensor) -> Tensor:
        arrays = [(t.float() if t.is_floating_point() else t).numpy() for t in tensors]
        out = request.infer(arrays)
        return torch.from_numpy(next(iter(out.values())).copy())
    return call


def patch_pipeline(pipe: "object", size: int, precision: str, threads: int) -> float:
    """Run a diffusers StableDiffusionPipeline's U-Net and VAE decoder through OpenVINO (for
    guided batches of 2 at `size` pixels); returns the conversion seconds. The modules stay in
    place (their config, device and dtype are what the pipeline reads); only their calls change."""
    import time
    from types import SimpleNamespace
    start = time.perf_counter()
    unet, vae, latent = pipe.unet, pipe.vae, size // 8
    width = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    unet_example = (torch.randn(2, 4, latent, latent, generator=generator),
                    torch.tensor(999, dtype=torch.int64),
                    torch.randn(2, 77, width, generator=generator))
    run_unet = compile_for(convert(unet.float(), "unet", unet_example), precision, threads)
    vae_example = (torch.randn(1, 4, latent, latent, generator=generator),)
    run_vae = compile_for(convert(vae.float(), "vae", vae_example), precision, threads)

    def unet_forward(sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                     return_dict: bool = True, **unused: object) -> object:
        out = run_unet(sample, timestep.reshape(()).to(torch.int64), encoder_hidden_states)
        out = out.to(sample.dtype)
        return SimpleNamespace(sample=out) if return_dict else (out,)

    def vae_decode(z: Tensor, return_dict: bool = True, **unused: object) -> object:
        out = torch.cat([run_vae(row[None]) for row in z]).to(z.dtype)  # compiled for batch 1
        return SimpleNamespace(sample=out) if return_dict else (out,)
    unet.forward, vae.decode = unet_forward, vae_decode
    return time.perf_counter() - start
