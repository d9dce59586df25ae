"""Per sampler: the time per step spent outside the network, as a share of the network's time.

    python scripts/bench_sampling.py                    # random U-Net, 32x32 latents, CPU
    python scripts/bench_sampling.py --ckpt model.safetensors --size 32 --steps 30

The network's time is the guided U-Net call ([uncond; cond] batched) at the given latent size.
The sampler's own time is measured by running the same sampler, guidance wrapper included,
over a stand-in U-Net that returns a precomputed output (so only the sampler's work remains).
Both are measured side by side in one run; the minimum of --repeats runs is reported.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from ldm.config import DiffusionConfig, UNetConfig  # noqa: E402
from ldm.diffusion.guidance import classifier_free_guidance  # noqa: E402
from ldm.diffusion.samplers import SAMPLERS, sample  # noqa: E402
from ldm.diffusion.schedule import make_schedule  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="take the U-Net from this checkpoint (default: random)")
    p.add_argument("--config", default=None, help="model config for --ckpt")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per run (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the minimum counts")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args()


def load_unet(args: argparse.Namespace) -> tuple[torch.nn.Module, DiffusionConfig, int]:
    """(U-Net, diffusion config, context width): from --ckpt, or a small random one."""
    if args.ckpt:
        import ldm
        pipe = ldm.load_pipeline(args.ckpt, config=args.config)
        return pipe.unet, pipe.config.diffusion, pipe.config.unet.context_dim
    from ldm.models.unet import UNetModel
    config = UNetConfig(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=1,
                        attention_resolutions=[2, 4], num_heads=4, context_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetModel(config).eval()
    return unet, DiffusionConfig(), config.context_dim


def best_time(fn, repeats: int) -> float:
    """Minimum wall time of fn() over `repeats` runs (one warm-up first)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unet, diffusion, width = load_unet(args)
    schedule = make_schedule(diffusion)
    g = torch.Generator().manual_seed(0)
    channels = unet.config.in_channels
    x = torch.randn(args.batch, channels, args.size, args.size, generator=g)
    context = torch.randn(args.batch, 77, width, generator=g)
    uncond = torch.randn(args.batch, 77, width, generator=g)
    kind = {"eps": 0, "v": 1, "x0": 2}[diffusion.prediction_type]
    real = classifier_free_guidance(unet, context, uncond, args.scale, prediction_type=kind)
    t = torch.full((args.batch,), 500)
    with torch.inference_mode():
        canned = real(x, t)  # a realistic output the stand-in returns every call
        network = best_time(lambda: real(x, t), args.repeats)
    stand_in = classifier_free_guidance(lambda xx, tt, cc: canned, context, uncond, args.scale,
                                        prediction_type=kind)
    print(f"U-Net guided call at {args.batch}x{channels}x{args.size}x{args.size}: "
          f"{network * 1e3:.2f} ms (threads {torch.get_num_threads()})")
    print(f"{'sampler':<16} {'steps':>5} {'evals':>5} {'sampler ms/step':>16} {'share of network':>17}")
    for name in SAMPLERS:
        evals = args.steps + (1 if name == "plms" else 0)

        def run() -> None:
            sample(name, stand_in, x, schedule, args.steps, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            own = best_time(run, args.repeats)
        per_step = own / args.steps
        share = own / (evals * network)
        print(f"{name:<16} {args.steps:>5} {evals:>5} {per_step * 1e3:>16.3f} {share * 100:>16.3f}%")


if __name__ == "__main__":
    main()
