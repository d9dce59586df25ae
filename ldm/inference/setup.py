"""A loaded pipeline made ready for fast inference on this machine, decided per CPU.

`load_pipeline` is what `ldm.load_pipeline` and the scripts use, so Python callers get the same
fast path as the command line: the precision picked for the device (bf16 where the CPU does bf16
arithmetic natively, see ldm.cpu), frozen eval-mode networks, and the convolution memory format
that measured faster on this machine (ldm.inference.autotune).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldm.config import ModelConfig
from ldm.cpu import cpu_info
from ldm.inference.autotune import decide
from ldm.inference.options import default_image_size
from ldm.pipeline import Pipeline
from ldm.runtime import compile_for_inference, prepare_for_inference, release_free_memory

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: str | torch.device) -> str:
    """fp16 on CUDA; on the CPU bf16 where it has bf16 arithmetic (avx512_bf16 or amx_bf16),
    else fp32 (emulated bf16 converts every operand and is slower than fp32)."""
    if torch.device(device).type == "cuda":
        return "fp16"
    return "bf16" if cpu_info().native_bf16 else "fp32"


def _unet_call(pipe: Pipeline, batch: int = 2):
    """A U-Net call at the model's native size with a CFG-sized batch (what sampling runs)."""
    side = default_image_size(pipe) // pipe.downsampling_factor
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, pipe.latent_channels, side, side, generator=generator)
    context = torch.randn(batch, 77, pipe.config.unet.context_dim, generator=generator)
    x, context = x.to(pipe.device, pipe.dtype), context.to(pipe.device, pipe.dtype)
    t = torch.full((batch,), 500, device=pipe.device)

    def call() -> None:
        with torch.inference_mode():
            pipe.unet(x, t, context)
    return call


def choose_channels_last(pipe: Pipeline, autotune: bool = True) -> bool:
    """channels_last convolutions or not, measured once per CPU, model width and dtype.

    On CUDA channels_last is kept (cuDNN's NHWC kernels); on the CPU oneDNN's choice of blocked
    layouts differs by processor, so the two formats are timed on a U-Net call."""
    if pipe.device.type != "cpu":
        return True
    unet = pipe.config.unet
    key = (f"unet {unet.model_channels}x{unet.channel_mult} ctx {unet.context_dim} "
           f"{str(pipe.dtype).removeprefix('torch.')} threads {torch.get_num_threads()}")
    call = _unet_call(pipe)

    def timed(channels_last: bool):
        def run() -> None:
            prepare_for_inference(pipe.unet, pipe.dtype, channels_last=channels_last)
            call()
        return run
    choice = decide("channels_last", key, {"on": timed(True), "off": timed(False)},
                    default="on", enabled=autotune)
    return choice == "on"


def prepare_pipeline(pipe: Pipeline, channels_last: bool | None = None, compile: bool = False,
                     autotune: bool = True) -> Pipeline:
    """Frozen eval-mode networks in the pipeline's dtype (in place); channels_last None decides
    per machine (choose_channels_last); compile wraps the U-Net (compile_for_inference)."""
    if channels_last is None:
        channels_last = choose_channels_last(pipe, autotune)
    for net in (pipe.unet, pipe.autoencoder):
        prepare_for_inference(net, pipe.dtype, channels_last=channels_last)
    release_free_memory()  # what loading and converting freed
    if compile:
        pipe.unet = compile_for_inference(pipe.unet)
    return pipe


def load_pipeline(checkpoint: str | Path, config: ModelConfig | str | Path | None = None,
                  device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                  use_ema: bool = False, *, prepare: bool = True,
                  autotune: bool = True) -> Pipeline:
    """A Pipeline from a checkpoint (ours or SD's; config: ModelConfig, our YAML, SD's YAML,
    a preset name, or None for the stored one), ready for inference.

    dtype: a torch dtype, "fp32" / "bf16" / "fp16", or None for default_precision(device).
    prepare: False returns the networks as loaded (fp32 modules converted to the dtype only).
    autotune: False skips measuring the memory format (channels_last, the former default).
    """
    if dtype is None:
        dtype = default_precision(device)
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
        dtype = PRECISIONS[dtype]
    pipe = Pipeline.from_checkpoint(checkpoint, config, device, dtype, use_ema)
    return prepare_pipeline(pipe, autotune=autotune) if prepare else pipe
