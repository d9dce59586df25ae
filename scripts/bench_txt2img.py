"""End-to-end txt2img time (text, guided sampling, decoding) and the share outside the networks.

    python scripts/bench_txt2img.py --model sd2-base --precision bf16    # 512x512, 20 steps
    python scripts/bench_txt2img.py --model CKPT.safetensors             # e.g. the default model

sd2-base: the SD 2.1-base architecture (U-Net 865.9M, VAE 83.7M, OpenCLIP ViT-H-14 text tower
from open_clip's registry) with random weights; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ldm.bench import format_table, median, peak_rss_mib
from ldm.runtime import prepare_pipeline, setup_cpu

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextmanager
def timed_methods(targets: dict[str, tuple[object, str]],
                  totals: dict[str, float]) -> Iterator[None]:
    """Accumulate wall time of obj.method calls into totals[name] (wrappers removed on exit)."""
    originals = {}
    for name, (obj, method) in targets.items():
        original = getattr(obj, method)
        # An instance attribute (torch.compile's OptimizedModule.forward) is put back on exit;
        # a class method is uncovered by deleting the wrapper.
        originals[name] = (obj, method, vars(obj).get(method))

        def wrapper(*args, _f: Callable = original, _name: str = name, **kwargs):  # noqa: ANN202
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - start
        setattr(obj, method, wrapper)
    try:
        yield
    finally:
        for obj, method, own in originals.values():
            if own is None:
                delattr(obj, method)  # back to the class's method
            else:
                setattr(obj, method, own)


def load(model: str, dtype: torch.dtype, channels_last: bool, compile: bool = False) -> "object":
    """A Pipeline: the SD 2.1-base architecture with random weights, or a checkpoint file."""
    import ldm
    from ldm.pipeline import Pipeline
    if model == "sd2-base":
        pipe = Pipeline.from_config("sd2", dtype=dtype, seed=0)
    else:
        pipe = ldm.load_pipeline(Path(model), dtype=dtype)
    pipe.text_encoder.eval().requires_grad_(False)
    return prepare_pipeline(pipe, channels_last=channels_last, compile=compile)


def run_once(pipe: object, opts: argparse.Namespace) -> dict[str, float]:
    """Seconds of one txt2img call, split into the networks and the rest."""
    totals: dict[str, float] = {}
    targets = {"text encoder": (pipe.text_encoder, "encode"), "U-Net": (pipe.unet, "forward"),
               "VAE decode": (pipe.autoencoder, "decode")}
    with timed_methods(targets, totals):
        start = time.perf_counter()
        pipe.txt2img(opts.prompt, height=opts.size, width=opts.size, steps=opts.steps,
                     sampler=opts.sampler, guidance_scale=opts.scale, seed=0)
        totals["total"] = time.perf_counter() - start
    totals["outside networks"] = totals["total"] - sum(totals[k] for k in targets)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd2-base",
                        help="'sd2-base' (random weights) or a checkpoint path")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: the model's native size, 512 for SD)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale (batched CFG)")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="U-Net and VAE in channels_last (default on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--no-allocator-tuning", dest="allocator", action="store_false")
    opts = parser.parse_args()
    setup_cpu(opts.threads, allocator=opts.allocator)
    pipe = load(opts.model, PRECISIONS[opts.precision], opts.channels_last, opts.compile)
    if opts.size is None:
        from ldm.generate import default_image_size
        opts.size = default_image_size(pipe)
    if opts.warmup:  # a 1-step run at the same size: first-call allocations and kernel selection
        run_once(pipe, argparse.Namespace(**{**vars(opts), "steps": 1}))
    runs = [run_once(pipe, opts) for _ in range(opts.repeats)]
    keys = ["total", "text encoder", "U-Net", "VAE decode", "outside networks"]
    total = median([r["total"] for r in runs])
    rows = [[k, f"{median([r[k] for r in runs]):.3f}",
             f"{100 * median([r[k] for r in runs]) / total:.2f}%"] for k in keys]
    print(f"{opts.model}, {opts.precision}, {opts.size}x{opts.size}, {opts.steps} steps "
          f"{opts.sampler}, guidance {opts.scale}, {torch.get_num_threads()} threads, "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    print(format_table(["part", "seconds", "share"], rows))


if __name__ == "__main__":
    main()
