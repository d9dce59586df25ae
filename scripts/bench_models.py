"""Our U-Net and VAE decoder vs diffusers' (the most-used peer) and OpenVINO's, SD 2.1-base.

Random weights, copied across so all compute the same function (outputs are compared), timed
alternately in one process; peak memory from one subprocess per measurement. OpenVINO runs the
same diffusers module converted with openvino.convert_model (static shapes, the fp32 or bf16
precision hint, the same thread count); conversion time is reported, not timed per call.
Ours runs as ldm.load_pipeline prepares it: the memory format measured on this machine.
Needs requirements-bench.txt (diffusers, openvino); the project itself never imports them.

    python scripts/bench_models.py                 # full table (several minutes of CPU)
    python scripts/bench_models.py --quick         # 32x32 U-Net and 256 px VAE, one repeat
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import openvino_peer
from ldm.bench import format_table, median, peak_rss_mib, reset_peak_rss, time_alternating
from ldm.checkpoint import PREFIXES
from ldm.config import ModelConfig
from ldm.cpu import cpu_info
from ldm.inference.setup import (choose_layout, compile_for_inference, decoder_call,
                                 decoder_key, plan_network, prepare_for_inference, unet_call,
                                 unet_key)
from ldm.inference.winograd_plan import conv_inputs
from ldm.models.winograd import TILES
from ldm.presets import PRESETS
from ldm.runtime import setup_cpu, tune_allocator

BATCH, TOKENS, SEED = 2, 77, 0


@dataclass(frozen=True)
class Case:
    """One benchmarked call: the network, the latent side and the precision."""
    net: str  # "unet" | "vae"
    latent: int  # latent side (image side / 8 for the VAE)
    precision: str  # "fp32" | "bf16"

    @property
    def label(self) -> str:
        size = f"{self.latent}x{self.latent} latent" if self.net == "unet" else f"decode {8 * self.latent}px"
        return f"{self.net} {size} {self.precision}"


# ---------------------------------------------------------------- building both sides


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial random weights: default init everywhere (SD zero-inits its output convs,
    which would make every output 0) and norms away from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return module


def original_config(config: ModelConfig) -> dict:
    """The SD inference-YAML shape that diffusers' single-file converters read."""
    u, a = config.unet, config.autoencoder
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels,
                model_channels=u.model_channels, channel_mult=u.channel_mult,
                num_res_blocks=u.num_res_blocks, attention_resolutions=u.attention_resolutions,
                transformer_depth=u.transformer_depth, context_dim=u.context_dim,
                use_linear_in_transformer=u.use_linear_in_transformer)
    if u.num_head_channels != -1:
        unet["num_head_channels"] = u.num_head_channels
    else:
        unet["num_heads"] = u.num_heads
    ddconfig = dict(ch=a.ch, ch_mult=a.ch_mult, num_res_blocks=a.num_res_blocks,
                    in_channels=a.in_channels, out_ch=a.out_ch, z_channels=a.z_channels,
                    resolution=a.resolution, attn_resolutions=a.attn_resolutions)
    return {"model": {"params": {"unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}},
                                 "scale_factor": config.diffusion.scale_factor}}}


def build_ours(net: str, config: ModelConfig) -> nn.Module:
    """Our U-Net or autoencoder with the benchmark's random weights."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.unet import UNetModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = UNetModel(config.unet) if net == "unet" else AutoencoderKL(config.autoencoder)
    return randomise(model, SEED).eval().requires_grad_(False)


def build_peer(net: str, config: ModelConfig, ours: nn.Module | None) -> nn.Module:
    """diffusers' model of the same configuration, with our weights when `ours` is given."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    original = original_config(config)
    prefix = PREFIXES["unet" if net == "unet" else "autoencoder"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if net == "unet":
            cfg = sfu.create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
            peer = UNet2DConditionModel(**cfg)
        else:
            cfg = sfu.create_vae_diffusers_config_from_ldm(original, {}, image_size=512)
            peer = AutoencoderKL(**cfg)
        if ours is not None:
            state = {prefix + k: v for k, v in ours.state_dict().items()}
            convert = sfu.convert_ldm_unet_checkpoint if net == "unet" else sfu.convert_ldm_vae_checkpoint
            peer.load_state_dict(convert(state, cfg), strict=True)
    return peer.eval().requires_grad_(False)


def inputs(case: Case, context_dim: int) -> tuple[Tensor, ...]:
    """Fixed random inputs: (x, t, context) for the U-Net, (z,) for the VAE decoder."""
    gen = torch.Generator().manual_seed(1)
    if case.net == "unet":
        x = torch.randn(BATCH, 4, case.latent, case.latent, generator=gen)
        t = torch.tensor([999.0, 500.0][:BATCH])
        return x, t, torch.randn(BATCH, TOKENS, context_dim, generator=gen)
    return (torch.randn(1, 4, case.latent, case.latent, generator=gen),)


def call_ours(model: nn.Module, case: Case, args: tuple[Tensor, ...]) -> Callable[[], Tensor]:
    if case.net == "unet":
        return lambda: model(*args)
    dtype = next(model.parameters()).dtype
    z = args[0].to(dtype)  # as Pipeline.decode_latents does
    return lambda: model.decode(z).float()


def call_peer(model: nn.Module, case: Case, args: tuple[Tensor, ...]) -> Callable[[], Tensor]:
    """The peer as its users run bf16 on a CPU: fp32 weights under bf16 autocast."""
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if case.precision == "bf16"
           else nullcontext())

    def run() -> Tensor:
        with amp:
            if case.net == "unet":
                return model(args[0], args[1], encoder_hidden_states=args[2]).sample
            return model.decode(args[0]).sample
    return run


def rel_l2(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- measurements


def measure_memory(side: str, case: Case, opts: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh subprocess that builds one model and runs the call twice."""
    cmd = [sys.executable, __file__, "--_memory", json.dumps([side, case.net, case.latent,
                                                                case.precision]),
           "--threads", str(opts.threads)]
    if opts.channels_last is not None:
        cmd.append("--channels-last" if opts.channels_last else "--no-channels-last")
    if opts.prepacked is not None:
        cmd.append("--prepacked" if opts.prepacked else "--no-prepacked")
    if not opts.autotune:
        cmd.append("--no-autotune")
    if side == "peer" or not opts.allocator:  # the peer as its users run it: default glibc
        cmd.append("--no-allocator-tuning")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory subprocess failed: {out.stderr.strip()[-400:]}")
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(spec: str, opts: argparse.Namespace) -> None:
    side, net, latent, precision = json.loads(spec)
    case = Case(net, latent, precision)
    config = PRESETS["sd2"]()
    if side == "ours":
        model, dtype = build_ours(net, config), precision_dtype(precision)
        model = prepare_for_inference(model, dtype, **layout(model, net, config, dtype, opts))
        fn = call_ours(model, case, inputs(case, config.unet.context_dim))
    else:
        fn = call_peer(build_peer(net, config, None), case, inputs(case, config.unet.context_dim))
    if opts.allocator:  # only now: the fp32 build's freed pages go back to the OS first
        tune_allocator()
    gc.collect()
    reset_peak_rss()  # count the resident weights plus the call's peak, not the build
    with torch.inference_mode():
        fn()
        fn()
    print(f"{peak_rss_mib():.0f}")


def precision_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def run_cases(cases: list[Case], opts: argparse.Namespace) -> list[list[object]]:
    """fp32 cases first; then our model is converted in place, keeping one copy in memory."""
    config = PRESETS["sd2"]()
    rows: list[list[object]] = []
    for net in ("unet", "vae"):
        net_cases = [c for c in cases if c.net == net]
        if not net_cases:
            continue
        ours = build_ours(net, config)
        peer = build_peer(net, config, ours)
        ours = prepare_for_inference(ours, torch.float32,
                                     **layout(ours, net, config, torch.float32, opts))
        converted: dict[int, object] = {}  # OpenVINO model per latent size, compiled per precision
        refs: dict[int, Tensor] = {}  # our fp32 output per latent size: the bf16 reference
        with torch.inference_mode():
            for case in net_cases:
                if case.precision == "bf16" and case.latent not in refs:
                    refs[case.latent] = call_ours(ours, case, inputs(case, config.unet.context_dim))()
        for precision in ("fp32", "bf16"):
            if not any(c.precision == precision for c in net_cases):
                continue  # no such cases: no conversion, no layout measurement (minutes at SD size)
            if precision == "bf16":
                ours = prepare_for_inference(ours, torch.bfloat16,
                                             **layout(ours, net, config, torch.bfloat16, opts))
            for case in (c for c in net_cases if c.precision == precision):
                winograd(ours, config, case, opts)
                ov_call = None
                if opts.openvino:
                    example = inputs(case, config.unet.context_dim)
                    if case.latent not in converted:
                        start = time.perf_counter()
                        converted[case.latent] = openvino_peer.convert(peer, net, example)
                        print(f"OpenVINO conversion of {net} at {case.latent}: "
                              f"{time.perf_counter() - start:.0f} s", flush=True)
                    ov_call = openvino_peer.compile_for(converted[case.latent], case.precision,
                                                        opts.threads)
                rows.append(run_case(case, ours, refs.get(case.latent), peer, ov_call, config, opts))
                print(" | ".join(map(str, rows[-1])), flush=True)
        del ours, peer
    return rows


def layout(ours: nn.Module, net: str, config: ModelConfig, dtype: torch.dtype,
           opts: argparse.Namespace) -> dict[str, bool]:
    """prepare_for_inference's channels_last and prepacked: --channels-last / --prepacked when
    given, else what ldm.load_pipeline decides for the U-Net on this machine (measured once at
    SD's native 64x64 latent); the VAE follows the U-Net's decisions made in the same run
    (channels_last, unpacked when there were none, e.g. in a memory subprocess)."""
    decided = vars(opts).setdefault("decided", {})
    if net == "unet" and dtype not in decided:
        decided[dtype] = choose_layout(ours, config.unet, dtype, 64, autotune=opts.autotune,
                                       channels_last=opts.channels_last, prepacked=opts.prepacked)
    return decided.get(dtype, {"channels_last": opts.channels_last in (None, True),
                               "prepacked": bool(opts.prepacked)})


def winograd(ours: nn.Module, config: ModelConfig, case: Case, opts: argparse.Namespace) -> None:
    """Upsampling forms and Winograd layers for this case's latent size, as load_pipeline
    decides them for its."""
    dtype = precision_dtype(case.precision)
    prepacked = layout(ours, case.net, config, dtype, opts)["prepacked"]
    if case.net == "unet":
        call = unet_call(ours, config.unet, dtype, case.latent)
        key = unet_key(config.unet, dtype, case.latent, prepacked)
    else:
        call = decoder_call(ours, case.latent)
        key = decoder_key(config.autoencoder, dtype, case.latent, prepacked)
    direct, used = plan_network(ours, call, key, dtype, autotune=opts.autotune,
                                winograd=opts.winograd)
    # Which tile side each layer runs at this size (one more call, untimed).
    tiles = Counter(getattr(conv, "winograd_tiles", {}).get(tuple(shape[-2:]), 0)
                    for conv, shape in conv_inputs(ours, call).items())
    print(f"{case.label}: {used} convolutions by Winograd's algorithm ("
          + ", ".join(f"F({m}x{m}, 3x3) {tiles[m]}" for m in TILES) + "); upsampling "
          + (f"direct at {direct}" if direct else "folded throughout"), flush=True)


def run_case(case: Case, ours: nn.Module, ref: Tensor | None, peer: nn.Module,
             ov_call: Callable[..., Tensor] | None, config: ModelConfig,
             opts: argparse.Namespace) -> list[object]:
    args = inputs(case, config.unet.context_dim)
    if opts.compile and case.net == "unet":  # fresh per case (weights frozen in)
        # ours was converted to bf16 in place after the fp32 cases: dynamo's guards do not see
        # that, and would reuse the fp32 graph with its frozen fp32 weights (oneDNN then fails
        # on the bf16 input), so every compiled case starts from an empty cache.
        torch._dynamo.reset()
        ours = compile_for_inference(ours)
    fns = {"ours": call_ours(ours, case, args), "peer": call_peer(peer, case, args)}
    if ov_call is not None:
        fns["openvino"] = lambda: ov_call(*args)
    with torch.inference_mode():
        outs = {name: fn().float() for name, fn in fns.items()}
        # agreement: fp32 vs diffusers' fp32; bf16 (every side) vs our fp32 (the 2% target)
        ref = outs["peer"] if case.precision == "fp32" else ref
        errs = {name: rel_l2(out, ref) for name, out in outs.items()}
        times = time_alternating(fns, opts.repeats, warmup=0)  # the agreement calls warmed up
    t = {name: median(values) for name, values in times.items()}
    err = f"{errs['ours']:.1e}" + ("" if case.precision == "fp32" else f" (peer {errs['peer']:.1e})")
    row: list[object] = [case.label, f"{t['ours']:.3f}", f"{t['peer']:.3f}",
                         f"{t['ours'] / t['peer']:.2f}", err]
    if ov_call is not None:
        row += [f"{t['openvino']:.3f}", f"{t['ours'] / t['openvino']:.2f}",
                f"{errs['openvino']:.1e}"]
    if opts.memory:
        m_ours, m_peer = (measure_memory(s, case, opts) for s in ("ours", "peer"))
        row += [f"{m_ours:.0f}", f"{m_peer:.0f}", f"{m_ours / m_peer:.2f}"]
    return row


HEADERS = ["case (SD 2.1-base)", "ours s", "diffusers s", "ours/diffusers", "rel L2 err"]
OPENVINO_HEADERS = ["OpenVINO s", "ours/OpenVINO", "OpenVINO rel L2 err"]
MEMORY_HEADERS = ["ours peak MiB", "peer peak MiB", "mem ratio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the 32x32 U-Net and 256 px VAE cases, one repeat, no memory")
    parser.add_argument("--nets", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64],
                        help="latent sides (VAE decodes to 8x this)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory subprocesses")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="force ours into (or out of) channels_last; default: the format "
                             "ldm.load_pipeline measures on this machine")
    parser.add_argument("--prepacked", action=argparse.BooleanOptionalAction, default=None,
                        help="force ours to use (or not) oneDNN-packed convolution weights; "
                             "default: what ldm.load_pipeline measures on this machine")
    parser.add_argument("--no-winograd", dest="winograd", action="store_false",
                        help="every convolution direct; default: Winograd's F(2x2, 3x3) or "
                             "F(4x4, 3x3) for the fp32 U-Net and decoder layers where it "
                             "measures clearly faster on this machine, as ldm.load_pipeline "
                             "decides (here per latent size; the upsampling blocks' folded "
                             "or direct form is still measured)")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="no measured layout: channels_last, unpacked, folded upsampling, "
                             "direct convolutions, as with txt2img's flag")
    parser.add_argument("--openvino", action=argparse.BooleanOptionalAction,
                        default=openvino_peer.available(),
                        help="add OpenVINO as a second peer (default: when it is installed)")
    parser.add_argument("--no-allocator-tuning", dest="allocator", action="store_false")
    parser.add_argument("--compile", action="store_true",
                        help="time ours through ldm.inference.setup.compile_for_inference (inductor with "
                             "frozen weights; U-Net cases, fp32 and bf16; the first call of "
                             "each case compiles, untimed; the VAE and the memory subprocesses "
                             "stay eager)")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._memory:
        setup_cpu(opts.threads, allocator=False)
        memory_child(opts._memory, opts)
        return
    setup_cpu(opts.threads, allocator=opts.allocator)
    if opts.quick:
        opts.sizes, opts.repeats, opts.memory = [32], 1, False
    cases = [Case(n, s, p) for n in opts.nets for p in opts.precisions for s in opts.sizes]
    print(f"{cpu_info().describe()}; torch {torch.__version__}, {torch.get_num_threads()} "
          "threads", flush=True)
    rows = run_cases(cases, opts)
    headers = HEADERS + (OPENVINO_HEADERS if opts.openvino else []) + \
        (MEMORY_HEADERS if opts.memory else [])
    print()
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
