"""A loaded pipeline made ready for fast inference on this machine, decided per CPU.

`load_pipeline` is what `ldm.load_pipeline` and the scripts use, so Python callers get the same
fast path as the command line: the precision picked for the device (bf16 where the CPU does bf16
arithmetic natively, see ldm.cpu), frozen eval-mode networks, and the convolution memory format,
weight packing (ldm.models.prepacked), linear packing with the fused GEGLU
(ldm.models.packed_linear), per upsampling block the folded or the direct form
(ldm.inference.upsample_plan) and, per fp32 layer, Winograd's algorithm
(ldm.inference.winograd_plan) where they measured faster on this machine
(ldm.inference.autotune).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ldm.config import AutoencoderConfig, ModelConfig, UNetConfig
from ldm.cpu import cpu_info
from ldm.inference.autotune import decide
from ldm.inference.options import default_image_size
from ldm.inference.upsample_plan import choose_upsampling
from ldm.inference.winograd_plan import choose_winograd
from ldm.models.packed_linear import available as packed_linear_available
from ldm.models.packed_linear import set_packed_linear
from ldm.models.prepacked import available as prepacking_available
from ldm.models.prepacked import set_prepacked, set_winograd
from ldm.models.upsample import set_upsampling
from ldm.pipeline import Pipeline
from ldm.runtime import release_free_memory

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch", "openvino")  # what runs the U-Net and VAE decoder (load_pipeline)


def default_precision(device: str | torch.device) -> str:
    """fp16 on CUDA; on the CPU bf16 where it has bf16 arithmetic (avx512_bf16 or amx_bf16),
    else fp32 (emulated bf16 converts every operand and is slower than fp32)."""
    if torch.device(device).type == "cuda":
        return "fp16"
    return "bf16" if cpu_info().native_bf16 else "fp32"


def prepare_for_inference(module: torch.nn.Module, dtype: torch.dtype = torch.float32,
                          channels_last: bool = False, prepacked: bool = False,
                          packed_linear: bool = False) -> torch.nn.Module:
    """Frozen eval-mode network in `dtype` (bf16: weights in bf16, norms and softmax keep fp32
    statistics inside the layers), with channels_last or plain (NCHW) convolution weights:
    either way explicitly, so a module prepared before in the other format is converted back.
    prepacked: convolutions keep a oneDNN-packed weight (ldm.models.prepacked; channels_last
    only, where the packed path applies); packed_linear: so do linear layers, GEGLU with its
    GELU and product inside the matrix multiply (ldm.models.packed_linear); both set or unset
    explicitly too."""
    module = module.eval().requires_grad_(False).to(dtype)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    set_prepacked(module, prepacked and channels_last)
    set_packed_linear(module, packed_linear)
    return module.to(memory_format=layout)


def compile_for_inference(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile (inductor) for frozen-weight inference; the fused ops have fake kernels.

    `freezing` lets inductor treat the weights as constants and pre-pack them for oneDNN once,
    instead of reordering every convolution and linear weight on every call; without it the
    compiled U-Net is slower than eager. Compiling takes about a minute per shape for SD.
    The compiled module must not be trained or have its weights changed afterwards, in dtype
    either: dynamo's guards do not see an in-place `.to(torch.bfloat16)` of the module, and
    the old graph, with its frozen fp32 weights, then fails inside oneDNN ("could not create a
    primitive descriptor"). Convert first, then compile (as prepare_pipeline does), or call
    torch._dynamo.reset() in between. Compiled and eager bf16 differ by about 0.7% relative
    L2, as bf16 and fp32 do. The VAE decoder gains nothing compiled and runs once per image,
    so pipelines compile only the U-Net (docs/performance.md).
    """
    # Process-wide inductor flag: options={"freezing": True} passed to torch.compile does not
    # take effect (the unfrozen speed), so the flag is set directly.
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    return torch.compile(module, dynamic=False)


LatentSide = int | tuple[int, int]  # a square's side, or (height, width)


def _hw(latent_side: LatentSide) -> tuple[int, int]:
    return (latent_side, latent_side) if isinstance(latent_side, int) else tuple(latent_side)


def _side_text(latent_side: LatentSide) -> str:
    """"64" for a square (the keys measured before rectangles existed), else "64x96"."""
    h, w = _hw(latent_side)
    return str(h) if h == w else f"{h}x{w}"


def unet_call(unet: torch.nn.Module, config: UNetConfig, dtype: torch.dtype,
              latent_side: LatentSide, device: str | torch.device = "cpu") -> Callable[[], object]:
    """One inference call of `unet` on a CFG-sized batch of 2 at `latent_side`: what the
    layout decisions time."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, *_hw(latent_side), generator=generator)
    context = torch.randn(2, 77, config.context_dim, generator=generator)
    x, context = x.to(device, dtype), context.to(device, dtype)
    t = torch.full((2,), 500, device=device)
    extra = {"y": torch.zeros(2, dtype=torch.long)} if getattr(config, "num_classes", None) else {}

    def run() -> None:
        with torch.inference_mode():
            unet(x, t, context, **extra)
    return run


def decoder_call(autoencoder: torch.nn.Module, latent_side: LatentSide) -> Callable[[], object]:
    """One decode of a `latent_side` latent: what the decoder's Winograd plan times."""
    weight = next(autoencoder.parameters())
    z = torch.randn(1, autoencoder.config.embed_dim, *_hw(latent_side),
                    generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)

    def run() -> None:
        with torch.inference_mode():
            autoencoder.decode(z)
    return run


def unet_key(config: UNetConfig, dtype: torch.dtype, latent_side: LatentSide,
             prepacked: bool) -> str:
    """What the U-Net's Winograd plan depends on besides the CPU."""
    return f"{decision_key(config, dtype, latent_side)} packed {prepacked}"


def decoder_key(config: AutoencoderConfig, dtype: torch.dtype, latent_side: LatentSide,
                prepacked: bool) -> str:
    """What the decoder's Winograd plan depends on besides the CPU."""
    return (f"decoder {config.ch}x{config.ch_mult} z {config.embed_dim} "
            f"side {_side_text(latent_side)} "
            f"{run_key(dtype)} packed {prepacked}")


def run_key(dtype: torch.dtype) -> str:
    """What every measured decision depends on besides the CPU and network: dtype, threads."""
    return f"{str(dtype).removeprefix('torch.')} threads {torch.get_num_threads()}"


def decision_key(config: UNetConfig, dtype: torch.dtype, latent_side: LatentSide) -> str:
    """What a layout decision depends on besides the CPU: U-Net width, input, dtype, threads."""
    return (f"unet {config.model_channels}x{config.channel_mult} in {config.in_channels} "
            f"ctx {config.context_dim} side {_side_text(latent_side)} {run_key(dtype)}")


def measured_switch(name: str, unet: torch.nn.Module, config: UNetConfig, dtype: torch.dtype,
                    latent_side: int, switch: Callable[[bool, bool], object], default: bool,
                    device: str | torch.device = "cpu", autotune: bool = True) -> bool:
    """On or off, whichever makes a U-Net call with a CFG-sized batch of 2 at `latent_side`
    faster, measured once per CPU, U-Net width and dtype (`default` without autotuning).
    `switch(on, drop)` sets the module up either way and is left at the choice; while
    measuring `drop` is False, so what it packs survives switching off and only the warm-up
    call packs (as a user's first call does, once)."""
    call = unet_call(unet, config, dtype, latent_side, device)

    def timed(on: bool) -> Callable[[], None]:
        def run() -> None:
            switch(on, False)
            call()
        return run
    choice = decide(name, decision_key(config, dtype, latent_side),
                    {"on": timed(True), "off": timed(False)},
                    default="on" if default else "off", enabled=autotune) == "on"
    switch(choice, True)
    return choice


def choose_channels_last(unet: torch.nn.Module, config: UNetConfig, dtype: torch.dtype,
                         latent_side: int, device: str | torch.device = "cpu",
                         autotune: bool = True) -> bool:
    """channels_last convolutions or not, measured once per CPU, U-Net width and dtype.

    On CUDA channels_last is kept (cuDNN's NHWC kernels); on the CPU oneDNN's choice of blocked
    layouts differs by processor, so both formats are timed (measured_switch; the module is
    left in the format chosen)."""
    if torch.device(device).type != "cpu":
        return True
    return measured_switch(
        "channels_last", unet, config, dtype, latent_side,
        lambda on, _: prepare_for_inference(unet, dtype, channels_last=on), True, device,
        autotune)


def choose_prepacked(unet: torch.nn.Module, config: UNetConfig, dtype: torch.dtype,
                     latent_side: int, device: str | torch.device = "cpu",
                     autotune: bool = True) -> bool:
    """oneDNN-packed convolution weights or not (channels_last only), measured once per CPU,
    U-Net width and dtype like the memory format; off without autotuning, off the CPU and
    where this PyTorch lacks the ops. The module is left channels_last, packed as decided."""
    if torch.device(device).type != "cpu" or not prepacking_available():
        return False
    prepare_for_inference(unet, dtype, channels_last=True)
    return measured_switch("prepacked", unet, config, dtype, latent_side,
                           partial(set_prepacked, unet), False, device, autotune)


def choose_packed_linear(unet: torch.nn.Module, config: UNetConfig, dtype: torch.dtype,
                         latent_side: int, device: str | torch.device = "cpu",
                         autotune: bool = True) -> bool:
    """oneDNN-packed linear weights and the fused GEGLU (ldm.models.packed_linear) or not,
    measured once per CPU, U-Net width and dtype with the U-Net in the memory format and
    convolution packing it has; off without autotuning, off the CPU and where this PyTorch
    lacks the ops. The module is left as decided."""
    if torch.device(device).type != "cpu" or not packed_linear_available():
        return False
    return measured_switch("packed_linear", unet, config, dtype, latent_side,
                           partial(set_packed_linear, unet), False, device, autotune)


def choose_layout(unet: torch.nn.Module, config: UNetConfig, dtype: torch.dtype,
                  latent_side: int, device: str | torch.device = "cpu", autotune: bool = True,
                  channels_last: bool | None = None, prepacked: bool | None = None,
                  packed_linear: bool | None = None) -> dict[str, bool]:
    """prepare_for_inference's channels_last, prepacked and packed_linear: the given values,
    the others decided per machine (convolution packing is only measured for channels_last)."""
    if channels_last is None:
        channels_last = choose_channels_last(unet, config, dtype, latent_side, device, autotune)
    if prepacked is None:
        prepacked = channels_last and choose_prepacked(unet, config, dtype, latent_side, device,
                                                       autotune)
    if packed_linear is None:
        prepare_for_inference(unet, dtype, channels_last, prepacked)
        packed_linear = choose_packed_linear(unet, config, dtype, latent_side, device, autotune)
    return {"channels_last": channels_last, "prepacked": prepacked,
            "packed_linear": packed_linear}


def prepare_pipeline(pipe: Pipeline, channels_last: bool | None = None, compile: bool = False,
                     autotune: bool = True, prepacked: bool | None = None) -> Pipeline:
    """Frozen eval-mode networks in the pipeline's dtype (in place); channels_last and
    prepacked None decide per machine (choose_channels_last, choose_prepacked; packed linears
    always, choose_packed_linear; the VAE follows the U-Net's decisions); upsampling forms and
    Winograd layers are chosen per network, for the U-Net at the default image size and the
    decoder decoding it (plan_layers; prepare_size for another size); compile wraps the U-Net
    (compile_for_inference)."""
    side = default_image_size(pipe) // pipe.downsampling_factor
    layout = choose_layout(pipe.unet, pipe.config.unet, pipe.dtype, side, pipe.device, autotune,
                           channels_last, prepacked)
    for net in (pipe.unet, pipe.autoencoder):
        prepare_for_inference(net, pipe.dtype, **layout)
    plan_layers(pipe, side, autotune)
    release_free_memory()  # what loading and converting freed
    if compile:
        pipe.unet = compile_for_inference(pipe.unet)
    return pipe


def plan_layers(pipe: Pipeline, latent_side: LatentSide, autotune: bool = True,
                decoder_side: LatentSide | None = None) -> None:
    """The U-Net's upsampling forms, then its Winograd layers (which include the convolutions
    of blocks that take the direct form), for latents of `latent_side`, and the decoder's for
    the latents it decodes at once, `decoder_side` (default: the same; a tile's side for tiled
    decoding), each measured once per machine (choose_upsampling, choose_winograd) and applied
    in place of those chosen for other sizes."""
    prepacked = any(getattr(m, "packing", False) for m in pipe.unet.modules()
                    if isinstance(m, torch.nn.Conv2d))  # GEGLU's packing is its linears
    config, dtype = pipe.config, pipe.dtype
    decoder_side = latent_side if decoder_side is None else decoder_side
    calls = {pipe.unet: (unet_call(pipe.unet, config.unet, dtype, latent_side, pipe.device),
                         unet_key(config.unet, dtype, latent_side, prepacked)),
             pipe.autoencoder: (decoder_call(pipe.autoencoder, decoder_side),
                                decoder_key(config.autoencoder, dtype, decoder_side, prepacked))}
    for net, (call, key) in calls.items():
        plan_network(net, call, key, dtype, pipe.device, autotune)


def plan_network(net: torch.nn.Module, call: Callable[[], object], key: str,
                 dtype: torch.dtype, device: str | torch.device = "cpu", autotune: bool = True,
                 winograd: bool = True) -> tuple[str, int]:
    """One network's upsampling forms, then its Winograd layers (with the convolutions of the
    blocks that take the direct form), for the inputs of `call`, in place of those chosen for
    other inputs; winograd False keeps every convolution direct. Returns the upsampling plan
    (choose_upsampling) and how many convolutions use Winograd's algorithm."""
    set_winograd(net, lambda conv: {})  # the kernels of another size's plan go first
    set_upsampling(net, lambda block: ())
    direct = choose_upsampling(net, call, key, device, autotune)
    if direct:  # the Winograd plan then also times the direct form's convolutions
        key = f"{key} direct upsampling {direct}"
    return direct, choose_winograd(net, call, key, dtype, device, autotune and winograd)


def prepare_size(pipe: Pipeline, height: int, width: int, vae_tile: int = 0,
                 autotune: bool = True) -> None:
    """Make `pipe` fast for images of height x width pixels whose latents are decoded in
    tiles of side `vae_tile` (0: in one pass, ldm.models.tiling), in place of the size it was
    made fast for before (prepare_pipeline: the default size in one pass). Remembered plans
    only switch layers (kernels are made at the next call); the first time on a machine a size
    is measured, about a minute at SD size."""
    f = pipe.downsampling_factor
    side = (height // f, width // f)
    # A tiled decode sees tiles of vae_tile (or the whole side, where that is smaller).
    decoder_side = tuple(min(s, vae_tile) for s in side) if vae_tile else side
    plan_layers(pipe, side, autotune, decoder_side)
    release_free_memory()


def load_pipeline(checkpoint: str | Path, config: ModelConfig | str | Path | None = None,
                  device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                  use_ema: bool = False, *, prepare: bool = True,
                  autotune: bool = True, backend: str = "torch") -> Pipeline:
    """A Pipeline from a checkpoint (ours or SD's; config: ModelConfig, our YAML, SD's YAML,
    a preset name, or None for the stored one), ready for inference.

    dtype: a torch dtype, "fp32" / "bf16" / "fp16", or None for default_precision(device).
    prepare: False returns the networks as loaded (fp32 modules converted to the dtype only).
    autotune: False skips measuring the memory format (channels_last, the former default).
    backend: "torch", or "openvino" to run the U-Net and VAE decoder through OpenVINO
    (ldm.inference.openvino_backend; the pipeline stays fp32 and dtype becomes OpenVINO's
    precision hint; models kept in its default cache).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if dtype is None:
        dtype = default_precision(device)
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
        dtype = PRECISIONS[dtype]
    if backend == "openvino":
        from ldm.inference.openvino_backend import default_cache, use_openvino
        pipe = Pipeline.from_checkpoint(checkpoint, config, device, torch.float32, use_ema)
        use_openvino(pipe, dtype, default_cache())
        release_free_memory()  # the PyTorch U-Net and decoder just let go
        return pipe
    pipe = Pipeline.from_checkpoint(checkpoint, config, device, dtype, use_ema)
    return prepare_pipeline(pipe, autotune=autotune) if prepare else pipe
