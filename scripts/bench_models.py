"""Our U-Net and VAE decoder vs diffusers' (the most-used peer) in the SD 2.1-base configuration.

Random weights, copied across so both compute the same function (outputs are compared),
timed alternately in one process; peak memory from one subprocess per measurement.
Needs requirements-bench.txt (diffusers); the project itself never imports it.

    python scripts/bench_models.py                 # full table (several minutes of CPU)
    python scripts/bench_models.py --quick         # 32x32 U-Net and 256 px VAE, one repeat
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.bench import format_table, median, peak_rss_mib, reset_peak_rss, time_alternating
from ldm.checkpoint import PREFIXES
from ldm.config import ModelConfig
from ldm.runtime import compile_for_inference, prepare_for_inference, setup_cpu, tune_allocator
from ldm.presets import PRESETS

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
           "--threads", str(opts.threads), "--channels-last" if opts.channels_last else "--no-channels-last"]
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
        model = prepare_for_inference(build_ours(net, config), precision_dtype(precision),
                                      channels_last=opts.channels_last)
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
        ours = prepare_for_inference(ours, torch.float32, channels_last=opts.channels_last)
        refs: dict[int, Tensor] = {}  # our fp32 output per latent size: the bf16 reference
        with torch.inference_mode():
            for case in net_cases:
                if case.precision == "bf16" and case.latent not in refs:
                    refs[case.latent] = call_ours(ours, case, inputs(case, config.unet.context_dim))()
        for precision in ("fp32", "bf16"):
            if precision == "bf16":
                ours = prepare_for_inference(ours, torch.bfloat16, channels_last=opts.channels_last)
            for case in (c for c in net_cases if c.precision == precision):
                rows.append(run_case(case, ours, refs.get(case.latent), peer, config, opts))
                print(" | ".join(map(str, rows[-1])), flush=True)
        del ours, peer
    return rows


def run_case(case: Case, ours: nn.Module, ref: Tensor | None, peer: nn.Module,
             config: ModelConfig, opts: argparse.Namespace) -> list[object]:
    args = inputs(case, config.unet.context_dim)
    if opts.compile and case.net == "unet":  # fresh per case (weights frozen in)
        # ours was converted to bf16 in place after the fp32 cases: dynamo's guards do not see
        # that, and would reuse the fp32 graph with its frozen fp32 weights (oneDNN then fails
        # on the bf16 input), so every compiled case starts from an empty cache.
        torch._dynamo.reset()
        ours = compile_for_inference(ours)
    fns = {"ours": call_ours(ours, case, args), "peer": call_peer(peer, case, args)}
    with torch.inference_mode():
        out_ours, out_peer = fns["ours"]().float(), fns["peer"]().float()
        # agreement: fp32 ours vs peer; bf16 (both sides) vs our fp32 (the 2% target)
        ref = out_peer if case.precision == "fp32" else ref
        err = rel_l2(out_ours, ref)
        peer_err = rel_l2(out_peer, ref) if case.precision == "bf16" else 0.0
        times = time_alternating(fns, opts.repeats, warmup=0)  # the agreement calls warmed up
    t_ours, t_peer = median(times["ours"]), median(times["peer"])
    row: list[object] = [case.label, f"{t_ours:.3f}", f"{t_peer:.3f}", f"{t_ours / t_peer:.2f}",
                         f"{err:.1e}" + ("" if case.precision == "fp32" else f" (peer {peer_err:.1e})")]
    if opts.memory:
        m_ours, m_peer = (measure_memory(s, case, opts) for s in ("ours", "peer"))
        row += [f"{m_ours:.0f}", f"{m_peer:.0f}", f"{m_ours / m_peer:.2f}"]
    return row


HEADERS = ["case (SD 2.1-base, 2 threads)", "ours s", "diffusers s", "ours/peer",
           "rel L2 err", "ours peak MiB", "peer peak MiB", "mem ratio"]


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
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="run ours in channels_last memory format (default on)")
    parser.add_argument("--no-allocator-tuning", dest="allocator", action="store_false")
    parser.add_argument("--compile", action="store_true",
                        help="time ours through ldm.runtime.compile_for_inference (inductor with "
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = run_cases(cases, opts)
    headers = HEADERS if opts.memory else HEADERS[:5]
    print()
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
