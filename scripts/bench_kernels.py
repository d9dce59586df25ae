"""Benchmark the fused kernels against the eager PyTorch they replace, side by side in one run.

    .venv/bin/python scripts/bench_kernels.py            # the full table (CPU, 2 threads)
    .venv/bin/python scripts/bench_kernels.py --quick    # two shapes, fewer repeats

Prints a Markdown table: GroupNorm+SiLU forward and backward (fused vs eager
F.silu(F.group_norm(x))) per shape, dtype and memory format, with the fused forward's GB/s
beside a same-size copy_ (the machine's practical bandwidth); then the sampler update vs the
eager sequence of ops it replaces; then how many rows meet each kernel performance target
(docs/performance.md) in this run; then the CPU's bf16 attention kernel (AMX tiles where the
CPU has them, vdpbf16ps elsewhere) vs PyTorch's SDPA in bf16 and fp32.
Times are medians (or --stat min) of interleaved repeats.

--cache hot (default) calls every op on the same input, so at the U-Net shapes (5-21 MB)
input and output stay in an L3 of 32 MB or more and copy_ runs at cache speed. --cache cold gives each
call the next of a pool of inputs larger than the L3 (--cold-mib), so inputs come from memory
and copy_ measures the memory bandwidth.

With --allocator heap (the default) on the CPU the script restarts itself once with glibc's
per-thread cache of small blocks off (GLIBC_TUNABLES=glibc.malloc.tcache_count=0), unless
--tcache is given. Why: every tensor comes from posix_memalign, which asks malloc for 96 bytes
more than the block and frees that tail; the tcache keeps the tail as an allocated block, so
a freed output cannot merge with it and the next same-size output does not fit there. In some
processes the outputs then cycle through 4-5 heap blocks (42-52 MB at 2x320x64x64 fp32) that
do not stay in a 32 MB L3, and every call writes its output to memory, so the same row is fast
or slow by process (docs/performance.md).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm._extension import fused_device_types
from ldm.runtime import enable_huge_pages, tune_allocator
from ldm.kernels import (PredictionType, flash_attention, group_norm_silu, sampler_step,
                         sampler_step_reference, step_coefficients)
from ldm.kernels.attention import fused_attention_op, uses_fused_attention

UNET_SHAPES = ["2x320x64x64", "2x640x32x32", "2x1280x16x16"]
VAE_SHAPES = ["1x512x64x64", "1x128x256x256", "1x128x512x512"]
SAMPLER_SHAPES = ["2x4x64x64", "2x4x128x128"]
# B x heads x queries x keys x head size: SD 2.x U-Net self-attention at 64x64 and 32x32
# latents, its cross-attention to 77 tokens, and the VAE's single-head attention at 512 px.
ATTENTION_SHAPES = ["2x5x4096x4096x64", "2x10x1024x1024x64", "2x5x4096x77x64",
                    "1x1x4096x4096x512"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=UNET_SHAPES + VAE_SHAPES,
                   help="GroupNorm shapes NxCxHxW (default: U-Net and VAE shapes; none: skip)")
    p.add_argument("--sampler-shapes", nargs="*", default=SAMPLER_SHAPES,
                   help="sampler-step latent shapes BxCxHxW (none: skip)")
    p.add_argument("--attention-shapes", nargs="*", default=ATTENTION_SHAPES,
                   help="attention shapes BxHxNxMxD (CPU bf16 kernel; none: skip)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--formats", nargs="+", default=["nchw", "channels_last"],
                   choices=["nchw", "channels_last"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=11, help="timed samples per measurement")
    p.add_argument("--min-sample-ms", type=float, default=10.0,
                   help="each sample loops the op at least this long")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic over samples (min is robust when other jobs share the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--allocator", choices=["heap", "pipeline", "glibc"], default="heap",
                   help="glibc malloc set-up: 'heap' (default) serves every block from the heap, "
                        "so after the warm-up no output page-faults and the table times the "
                        "kernels; 'pipeline' is txt2img's and training's set-up (blocks above "
                        "32 MiB (fp32 pipelines) are mapped per use: both sides then pay page faults at the large "
                        "VAE shapes); 'glibc' keeps the defaults (every block above 128 KiB-32 MiB "
                        "faults again)")
    p.add_argument("--tcache", action="store_true",
                   help="keep glibc's per-thread cache of small blocks (default with --allocator "
                        "heap on the CPU: off, by restarting with GLIBC_TUNABLES; with it, "
                        "same-size outputs may cycle through several heap blocks that do not "
                        "stay in the L3, per process; see the module docstring)")
    p.add_argument("--huge-pages", action="store_true",
                   help="transparent huge pages for tensors of 2 MiB and more (PyTorch's "
                        "THP_MEM_ALLOC_ENABLE; default off, as txt2img runs; with the tcache "
                        "off they change no target count)")
    p.add_argument("--cache", choices=["hot", "cold"], default="hot",
                   help="hot: every call reads the same input (cache-resident at the U-Net "
                        "shapes); cold: calls rotate through distinct inputs totalling at least "
                        "--cold-mib, so every input comes from memory")
    p.add_argument("--cold-mib", type=int, default=256,
                   help="--cache cold: total size of the rotated inputs (MiB; several times the "
                        "L3, so no input is still cached)")
    p.add_argument("--quick", action="store_true",
                   help="one U-Net and one VAE shape, 5 repeats (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats = [UNET_SHAPES[0], VAE_SHAPES[0]], 5
        args.sampler_shapes = SAMPLER_SHAPES[:1]
        args.attention_shapes = ATTENTION_SHAPES[1:2]
    return args


def parse_shape(text: str) -> tuple[int, ...]:
    """'2x320x64x64' -> (2, 320, 64, 64)."""
    return tuple(int(v) for v in text.lower().split("x"))


class Timer:
    """Medians of interleaved samples: every candidate is timed once per round."""

    def __init__(self, device: str, repeats: int, min_sample_s: float, stat: str) -> None:
        self.device, self.repeats, self.min_sample_s = device, repeats, min_sample_s
        self.stat = statistics.median if stat == "median" else min

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _loops(self, fn: Callable[[], object]) -> int:
        """Calls per sample so that one sample lasts at least min_sample_s."""
        fn()  # warm-up
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        once = max(time.perf_counter() - start, 1e-7)
        return max(1, int(self.min_sample_s / once))

    def compare(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Seconds per call of each function (median or min of samples), sampled round-robin."""
        loops = {name: self._loops(fn) for name, fn in fns.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(self.repeats):
            for name, fn in fns.items():
                self._sync()
                start = time.perf_counter()
                for _ in range(loops[name]):
                    fn()
                self._sync()
                samples[name].append((time.perf_counter() - start) / loops[name])
        return {name: self.stat(s) for name, s in samples.items()}


def rotate(fn: Callable[..., object], pool: list[tuple]) -> Callable[[], object]:
    """A call of fn on the next argument tuple of the pool each time (one tuple: always it)."""
    args = itertools.cycle(pool)
    return lambda: fn(*next(args))


def group_norm_row(timer: Timer, shape: tuple[int, ...], dtype: torch.dtype, fmt: str,
                   device: str, backward: bool, pool_size: int) -> dict[str, float]:
    """Forward/backward times of fused vs eager GroupNorm+SiLU and a same-size copy_, each
    call on the next of pool_size inputs."""
    groups = 32
    eps = 1e-5 if shape[0] == 2 else 1e-6  # U-Net vs VAE GroupNorm
    gen = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    xs = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype,
                                                memory_format=memory_format)
          for _ in range(pool_size)]
    w = torch.randn(shape[1], generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(shape[1], generator=gen).to(device=device, dtype=dtype)
    out = torch.empty_like(xs[0])

    def eager(x_, w_, b_):
        return F.silu(F.group_norm(x_, groups, w_, b_, eps))

    def fused(x_, w_, b_):
        return group_norm_silu(x_, groups, w_, b_, eps)

    inputs = [(x, w, b) for x in xs]
    # Forward timed as inference runs it (ldm.inference): under no_grad instead, the Python
    # autograd kernel that register_autograd installs adds about 10 us to every fused call
    # (it checks the inputs and redispatches); eager's C++ autograd layer costs nothing there.
    with torch.inference_mode():
        t = timer.compare({"fused": rotate(fused, inputs), "eager": rotate(eager, inputs),
                           "copy": rotate(out.copy_, [(x,) for x in xs])})
    row = {"fwd_fused": t["fused"], "fwd_eager": t["eager"], "copy": t["copy"]}
    if backward:
        wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
        cases = []  # (x, graph outputs, grad_y) per pool entry
        for x in xs:
            xg = x.detach().requires_grad_()
            cases.append((xg, {"fused": fused(xg, wg, bg), "eager": eager(xg, wg, bg)},
                          torch.randn_like(x)))
        del xs, inputs

        def grads(name: str) -> Callable[[], object]:
            return rotate(lambda xg, ys, gy: torch.autograd.grad(ys[name], (xg, wg, bg), gy,
                                                                 retain_graph=True), cases)

        t = timer.compare({name: grads(name) for name in ("fused", "eager")})
        row.update(bwd_fused=t["fused"], bwd_eager=t["eager"])
    return row


def pool_size(args: argparse.Namespace, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Inputs to rotate through: 1 (hot), else enough to fill --cold-mib (at least 2)."""
    if args.cache == "hot":
        return 1
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return max(2, math.ceil(args.cold_mib * 2**20 / nbytes))


def sampler_row(timer: Timer, shape: tuple[int, ...], device: str) -> dict[str, float]:
    """Fused sampler step vs the eager sequence (guided eps-DDIM step with noise)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    out = torch.randn((2 * shape[0], *shape[1:]), generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    coeffs = step_coefficients(a=0.8, s=0.6, guidance_scale=7.5, c_x0=0.9, c_eps=0.42,
                               c_noise=0.1).to(device)
    t = timer.compare({
        "fused": lambda: sampler_step(x, out, coeffs, noise, None, PredictionType.EPS),
        "eager": lambda: sampler_step_reference(x, out, coeffs, noise, None, PredictionType.EPS)})
    return {"fused": t["fused"], "eager": t["eager"]}


def attention_row(timer: Timer, shape: tuple[int, ...]) -> tuple[str, dict[str, float]]:
    """Fused bf16 attention vs SDPA in bf16 and in fp32 on [B, H, L, D] views of [B, L, H*D];
    also the name of what `flash_attention` ran (the CPU's kernel, or SDPA where it loses)."""
    b, h, n, m, d = shape
    gen = torch.Generator().manual_seed(0)

    def heads(length: int, dtype: torch.dtype) -> torch.Tensor:
        x = torch.randn(b, length, h * d, generator=gen).to(dtype)
        return x.view(b, length, h, d).transpose(1, 2)

    q, k, v = heads(n, torch.bfloat16), heads(m, torch.bfloat16), heads(m, torch.bfloat16)
    qf, kf, vf = q.float(), k.float(), v.float()
    kernel = fused_attention_op().__name__ if uses_fused_attention(q, k, v) else "SDPA"
    return kernel, timer.compare({
        "fused": lambda: flash_attention(q, k, v),
        "sdpa_bf16": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa_fp32": lambda: F.scaled_dot_product_attention(qf, kf, vf)})


def gbps(nbytes: int, seconds: float) -> float:
    """Bytes moved per second in GB/s."""
    return nbytes / seconds / 1e9


def target_rows(norm: list[dict[str, object]], sampler: list[float]) -> list[list[str]]:
    """The kernel performance targets against this run: [target, rows met / rows, range].

    norm: one dict per GroupNorm row (shape, dtype, fwd_x, pct_copy, bwd_x or None); sampler:
    the sampler-step ratios. A target whose rows were not run is left out; shapes outside the
    U-Net and VAE lists count only for the backward."""
    def unet(dtype: str | None = None) -> list[dict[str, object]]:
        return [r for r in norm if r["shape"] in UNET_SHAPES and dtype in (None, r["dtype"])]

    dtypes = sorted({str(r["dtype"]) for r in unet()}, key=list(DTYPES).index)
    targets = [(f"forward >= 2.5x eager, U-Net shapes, {d}", [r["fwd_x"] for r in unet(d)], 2.5,
                "x") for d in dtypes]
    targets += [
        ("forward >= 1.8x eager, VAE shapes",
         [r["fwd_x"] for r in norm if r["shape"] in VAE_SHAPES], 1.8, "x"),
        ("fused forward >= 60% of copy GB/s, U-Net shapes", [r["pct_copy"] for r in unet()], 60,
         "%"),
        ("backward >= 1.5x eager autograd",
         [r["bwd_x"] for r in norm if r["bwd_x"] is not None], 1.5, "x"),
        ("sampler step >= 3x eager", sampler, 3.0, "x"),
    ]
    rows = []
    for label, values, threshold, unit in targets:
        if not values:
            continue
        met = sum(float(v) >= threshold for v in values)
        lo, hi = min(map(float, values)), max(map(float, values))
        span = f"{lo:.0f}-{hi:.0f}%" if unit == "%" else f"{lo:.2f}-{hi:.2f}x"
        rows.append([label, f"{met}/{len(values)}", span])
    return rows


TCACHE_OFF = "glibc.malloc.tcache_count=0"


def tcache_off() -> bool:
    """Whether this process started with glibc's tcache off."""
    return TCACHE_OFF in os.environ.get("GLIBC_TUNABLES", "").split(":")


def restart_without_tcache(argv: list[str]) -> None:
    """Replace this process by the same command with glibc's tcache off (read at start-up)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, TCACHE_OFF) if t)}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    args = parse_args(argv)
    if args.device == "cpu" and args.allocator == "heap" and not args.tcache and not tcache_off():
        restart_without_tcache(sys.argv[1:] if argv is None else argv)
    huge_pages = args.huge_pages and enable_huge_pages()  # before the first tensor
    allocator = "glibc"
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        if args.allocator != "glibc" and tune_allocator(heap_only=args.allocator == "heap"):
            allocator = args.allocator
    fused_on = args.device in fused_device_types("group_norm_silu")
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"fused_kernels={'yes' if fused_on else 'NO (reference path)'} repeats={args.repeats} "
          f"stat={args.stat} allocator={allocator} tcache={'off' if tcache_off() else 'on'} "
          f"huge_pages={'on' if huge_pages else 'off'} cache={args.cache}"
          + (f" (inputs rotated through >= {args.cold_mib} MiB)" if args.cache == "cold" else ""))
    timer = Timer(args.device, args.repeats, args.min_sample_ms / 1e3, args.stat)
    norm_rows: list[dict[str, object]] = []
    sampler_ratios: list[float] = []
    if args.shapes:
        print("\n| shape | dtype | format | fwd fused ms | fwd eager ms | fwd x | fused GB/s | "
              "copy GB/s | % of copy | bwd fused ms | bwd eager ms | bwd x |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape_text in args.shapes:
        shape = parse_shape(shape_text)
        for dname in args.dtypes:
            for fmt in args.formats:
                r = group_norm_row(timer, shape, DTYPES[dname], fmt, args.device,
                                   not args.no_backward, pool_size(args, shape, DTYPES[dname]))
                nbytes = 2 * torch.Size(shape).numel() * DTYPES[dname].itemsize  # read + write
                fused_bw, copy_bw = gbps(nbytes, r["fwd_fused"]), gbps(nbytes, r["copy"])
                bwd = (f"{r['bwd_fused'] * 1e3:.2f} | {r['bwd_eager'] * 1e3:.2f} | "
                       f"{r['bwd_eager'] / r['bwd_fused']:.2f}" if "bwd_fused" in r else "- | - | -")
                print(f"| {shape_text} | {dname} | {fmt} | {r['fwd_fused'] * 1e3:.2f} | "
                      f"{r['fwd_eager'] * 1e3:.2f} | {r['fwd_eager'] / r['fwd_fused']:.2f} | "
                      f"{fused_bw:.1f} | {copy_bw:.1f} | {100 * fused_bw / copy_bw:.0f}% | {bwd} |",
                      flush=True)
                norm_rows.append({
                    "shape": shape_text, "dtype": dname, "fwd_x": r["fwd_eager"] / r["fwd_fused"],
                    "pct_copy": 100 * fused_bw / copy_bw,
                    "bwd_x": r["bwd_eager"] / r["bwd_fused"] if "bwd_fused" in r else None})
    if args.sampler_shapes:
        print("\n| sampler step (guided eps, noise) | fused us | eager us | x |")
        print("|---|---:|---:|---:|")
    for shape_text in args.sampler_shapes:
        r = sampler_row(timer, parse_shape(shape_text), args.device)
        print(f"| {shape_text} fp32 | {r['fused'] * 1e6:.1f} | {r['eager'] * 1e6:.1f} | "
              f"{r['eager'] / r['fused']:.2f} |", flush=True)
        sampler_ratios.append(r["eager"] / r["fused"])
    summary = target_rows(norm_rows, sampler_ratios)
    if summary:
        print("\n| target (this run) | rows met | range |")
        print("|---|---:|---:|")
        for label, met, span in summary:
            print(f"| {label} | {met} | {span} |", flush=True)
    if args.attention_shapes and args.device == "cpu" and "cpu" in fused_device_types("flash_attention"):
        print("\n| attention BxHxNxMxD | kernel | fused bf16 ms | SDPA bf16 ms | SDPA fp32 ms | "
              "x bf16 | x fp32 | fused GFLOP/s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for shape_text in args.attention_shapes:
            shape = parse_shape(shape_text)
            kernel, r = attention_row(timer, shape)
            b, h, n, m, d = shape
            flops = 4 * b * h * n * m * d  # two products, multiply + add
            print(f"| {shape_text} | {kernel} | {r['fused'] * 1e3:.1f} | "
                  f"{r['sdpa_bf16'] * 1e3:.1f} | "
                  f"{r['sdpa_fp32'] * 1e3:.1f} | {r['sdpa_bf16'] / r['fused']:.2f} | "
                  f"{r['sdpa_fp32'] / r['fused']:.2f} | {flops / r['fused'] / 1e9:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
