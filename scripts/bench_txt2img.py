"""End-to-end txt2img time (text, guided sampling, decoding) and the share outside the networks.

    python scripts/bench_txt2img.py --model sd2-base --precision bf16    # 512x512, 20 steps
    python scripts/bench_txt2img.py --model CKPT.safetensors             # e.g. the default model

sd2-base: the SD 2.1-base architecture (U-Net 865.9M, VAE 83.7M, OpenCLIP ViT-H-14 text tower
from open_clip's registry) with random weights; nothing is downloaded.

    python scripts/bench_txt2img.py --device cuda                   # on a GPU: fp16, CUDA timing
    python scripts/bench_txt2img.py --side peer --precision bf16   # diffusers' pipeline, same job
    python scripts/bench_txt2img.py --side openvino --precision bf16   # its U-Net and VAE in OpenVINO

--side peer runs diffusers' StableDiffusionPipeline in the same configuration (random weights,
transformers' CLIPTextModel in the SD 2.x text-tower configuration, DDIM) for the time and
peak-memory comparison; it has no tokenizer files offline, so it is given the text encoder's
embeddings of fixed token ids (the encoder still runs inside the timed call). --side openvino
is the same diffusers pipeline with its U-Net and VAE decoder converted by OpenVINO
(scripts/openvino_peer.py: static shapes, precision hint, same thread count; conversion untimed).
Every run prints the CPU model and the flags the project's choices depend on.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ldm.bench import format_table, median, peak_rss_mib, reset_peak_rss
from ldm.inference.setup import prepare_pipeline
from ldm.runtime import release_free_memory, setup_cpu

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronizer(device: str) -> Callable[[], None]:
    """What a wall-clock reading waits for first: the GPU's queued work on CUDA (kernels run
    asynchronously), nothing on the CPU."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@contextmanager
def timed_methods(targets: dict[str, tuple[object, str]], totals: dict[str, float],
                  sync: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Accumulate wall time of obj.method calls into totals[name] (wrappers removed on exit);
    `sync` runs before each reading (synchronizer)."""
    originals = {}
    for name, (obj, method) in targets.items():
        original = getattr(obj, method)
        # An instance attribute (torch.compile's OptimizedModule.forward) is put back on exit;
        # a class method is uncovered by deleting the wrapper.
        originals[name] = (obj, method, vars(obj).get(method))

        def wrapper(*args, _f: Callable = original, _name: str = name, **kwargs):  # noqa: ANN202
            sync()
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                sync()
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


class PeakMemory:
    """Peak RSS of loading (random weights are built in fp32 first, on both sides) and, after
    resetting the counter, of the txt2img runs themselves (loaded weights included); on CUDA
    the GPU memory PyTorch's allocator held at most, likewise."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device == "cuda"
        if self.cuda:
            self.load_mib = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            self.reset = True
        else:
            self.load_mib = peak_rss_mib()
            self.reset = reset_peak_rss()

    def report(self) -> str:
        if self.cuda:
            return (f"peak GPU memory: load {self.load_mib:.0f} MiB, runs "
                    f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        runs = f"{peak_rss_mib():.0f} MiB" if self.reset else "n/a (counter not resettable)"
        return f"peak RSS: load {self.load_mib:.0f} MiB, runs {runs}"


def load(model: str, dtype: torch.dtype, channels_last: bool | None, compile: bool = False,
         autotune: bool = True, backend: str = "torch", device: str = "cpu") -> "object":
    """A Pipeline: the SD 2.1-base architecture with random weights, or a checkpoint file;
    backend "openvino" runs its U-Net and VAE decoder through OpenVINO (dtype its hint)."""
    import ldm
    from ldm.pipeline import Pipeline
    load_dtype = torch.float32 if backend == "openvino" else dtype
    if model == "sd2-base":
        pipe = Pipeline.from_config("sd2", device=device, dtype=load_dtype, seed=0)
    else:
        pipe = ldm.load_pipeline(Path(model), device=device, dtype=load_dtype, prepare=False)
    pipe.text_encoder.eval().requires_grad_(False)
    if backend == "openvino":
        from ldm.inference.openvino_backend import default_cache, use_openvino
        use_openvino(pipe, dtype, default_cache())
        release_free_memory()  # as ldm.load_pipeline does
        return pipe
    return prepare_pipeline(pipe, channels_last=channels_last, compile=compile, autotune=autotune)


def load_peer(dtype: torch.dtype) -> "object":
    """diffusers' StableDiffusionPipeline, SD 2.1-base configuration, random weights, in dtype
    (weights converted: the peer's lowest-memory CPU set-up)."""
    import warnings

    from bench_models import build_peer  # scripts/ is on sys.path when run as a script
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.presets import PRESETS
    config = PRESETS["sd2"]()
    torch.manual_seed(0)
    # OpenCLIP ViT-H-14's text tower as SD 2.x's diffusers checkpoints configure it.
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=512))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(
            vae=build_peer("vae", config, None), text_encoder=text, tokenizer=None,
            unet=build_peer("unet", config, None), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def run_peer_once(pipe: object, opts: argparse.Namespace) -> dict[str, float]:
    """Seconds of one diffusers txt2img call (its networks are not split out)."""
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.inference_mode():
        embeddings = pipe.text_encoder(ids)[0]  # [negative; prompt]
        pipe(prompt_embeds=embeddings[1:], negative_prompt_embeds=embeddings[:1],
             height=opts.size, width=opts.size, num_inference_steps=opts.steps,
             guidance_scale=opts.scale, generator=torch.Generator().manual_seed(0),
             output_type="pil")
    return {"total": time.perf_counter() - start}


def run_once(pipe: object, opts: argparse.Namespace) -> dict[str, float]:
    """Seconds of one txt2img call, split into the networks and the rest."""
    from ldm.inference import SamplingOptions, txt2img
    totals: dict[str, float] = {}
    targets = {"text encoder": (pipe.text_encoder, "encode"), "U-Net": (pipe.unet, "forward"),
               "VAE decode": (pipe.autoencoder, "decode")}
    sync = synchronizer(opts.device)
    with timed_methods(targets, totals, sync):
        sync()
        start = time.perf_counter()
        txt2img(pipe, SamplingOptions(prompt=opts.prompt, height=opts.size, width=opts.size,
                                      steps=opts.steps, sampler=opts.sampler,
                                      guidance_scale=opts.scale, seed=0))
        sync()
        totals["total"] = time.perf_counter() - start
    totals["outside networks"] = totals["total"] - sum(totals[k] for k in targets)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd2-base",
                        help="'sd2-base' (random weights) or a checkpoint path")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where ours runs (cuda: --side ours only; times wait for the GPU, "
                             "memory is the GPU's)")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="auto (default): what txt2img picks for the device (CPU: bf16 "
                             "with avx512_bf16 or amx_bf16, else fp32; CUDA: fp16)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: the model's native size, 512 for SD)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale (batched CFG)")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="force the U-Net and VAE into (or out of) channels_last; default: "
                             "the format ldm.load_pipeline measures on this machine")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="no measured layout: channels_last, unpacked weights, folded "
                             "upsampling, direct convolutions (no Winograd)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--backend", choices=["torch", "openvino"], default="torch",
                        help="what runs our U-Net and VAE decoder (ldm.load_pipeline's backend; "
                             "openvino converts on first use, cached, and compiles in the "
                             "warm-up run)")
    parser.add_argument("--no-allocator-tuning", dest="allocator", action="store_false")
    parser.add_argument("--side", choices=["ours", "peer", "openvino", "both", "all"],
                        default="ours",
                        help="peer: diffusers' pipeline instead (sd2-base only, DDIM, glibc's "
                             "default allocator; needs requirements-bench.txt); openvino: the "
                             "same with its U-Net and VAE decoder run by OpenVINO; all: every "
                             "side in one process, runs alternating, one allocator setting "
                             "for all, ratios (no per-side memory); both: ours and diffusers "
                             "so (in fp32 a third pipeline may not fit in memory)")
    opts = parser.parse_args()
    from ldm.cpu import cpu_info
    from ldm.inference.setup import default_precision
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU is available here")
    if opts.device == "cuda" and (opts.side != "ours" or opts.backend != "torch"):
        raise SystemExit("error: --device cuda runs only --side ours with --backend torch")
    if opts.precision == "auto":
        opts.precision = default_precision(opts.device)
    if opts.precision == "fp16" and opts.device == "cpu":
        raise SystemExit("error: --precision fp16 is for --device cuda (the CPU runs fp32 or bf16)")
    where = (torch.cuda.get_device_name() if opts.device == "cuda" else cpu_info().describe())
    print(f"{where}; torch {torch.__version__}", flush=True)
    if opts.side in ("both", "all"):
        return main_all(opts)
    if opts.side != "ours":
        return main_peer(opts)
    setup_cpu(opts.threads, allocator=opts.allocator and opts.device == "cpu",
              dtype=PRECISIONS[opts.precision])
    pipe = load(opts.model, PRECISIONS[opts.precision], opts.channels_last, opts.compile,
                opts.autotune, opts.backend, opts.device)
    memory = PeakMemory(opts.device)
    if opts.size is None:
        from ldm.inference import default_image_size
        opts.size = default_image_size(pipe)
    if opts.warmup:  # a 1-step run at the same size: first-call allocations and kernel selection
        run_once(pipe, argparse.Namespace(**{**vars(opts), "steps": 1}))
    runs = [run_once(pipe, opts) for _ in range(opts.repeats)]
    keys = ["total", "text encoder", "U-Net", "VAE decode", "outside networks"]
    total = median([r["total"] for r in runs])
    rows = [[k, f"{median([r[k] for r in runs]):.3f}",
             f"{100 * median([r[k] for r in runs]) / total:.2f}%"] for k in keys]
    print(f"{opts.model}, {opts.device}, {opts.backend}, {opts.precision}, "
          f"{opts.size}x{opts.size}, "
          f"{opts.steps} steps "
          f"{opts.sampler}, guidance {opts.scale}, {torch.get_num_threads()} threads, "
          f"{memory.report()}")
    print(format_table(["part", "seconds", "share"], rows))


def main_all(opts: argparse.Namespace) -> None:
    """Ours, diffusers and (--side all) diffusers + OpenVINO in one process, runs alternating:
    the ratios."""
    import openvino_peer

    from ldm.bench import time_alternating
    if opts.model != "sd2-base" or opts.sampler != "ddim":
        raise SystemExit(f"error: --side {opts.side} runs only --model sd2-base with "
                         "--sampler ddim")
    dtype = PRECISIONS[opts.precision]
    setup_cpu(opts.threads, allocator=opts.allocator, dtype=dtype)
    opts.size = opts.size or 512
    ours = load(opts.model, dtype, opts.channels_last, opts.compile, opts.autotune, opts.backend)
    peer = load_peer(dtype)
    sides = {"ours": lambda o: run_once(ours, o), "diffusers": lambda o: run_peer_once(peer, o)}
    if opts.side == "all" and openvino_peer.available():
        openvino = load_peer(torch.float32)
        seconds = openvino_peer.patch_pipeline(openvino, opts.size, opts.precision, opts.threads)
        print(f"OpenVINO conversion and compilation: {seconds:.0f} s", flush=True)
        sides["diffusers + OpenVINO"] = lambda o: run_peer_once(openvino, o)
    one_step = argparse.Namespace(**{**vars(opts), "steps": 1})
    if opts.warmup:
        for run in sides.values():
            run(one_step)
    times = time_alternating({name: (lambda r=run: r(opts)) for name, run in sides.items()},
                             opts.repeats, warmup=0)
    ours_s = median(times["ours"])
    rows = [[name, f"{median(t):.2f}", f"{ours_s / median(t):.2f}"] for name, t in times.items()]
    print(f"sd2-base, ours on {opts.backend}, {opts.precision}, {opts.size}x{opts.size}, "
          f"{opts.steps} steps ddim, "
          f"guidance {opts.scale}, {torch.get_num_threads()} threads, allocator "
          f"{'tuned' if opts.allocator else 'glibc default'} for all, {opts.repeats} runs each")
    print(format_table(["side", "seconds", "ours / side"], rows))


def main_peer(opts: argparse.Namespace) -> None:
    """The same job through diffusers (or its OpenVINO-converted networks): seconds, peak RSS."""
    if opts.model != "sd2-base" or opts.sampler != "ddim":
        raise SystemExit(f"error: --side {opts.side} runs only --model sd2-base with --sampler ddim")
    setup_cpu(opts.threads, allocator=False)  # the peer with glibc's defaults, as its users run
    opts.size = opts.size or 512
    if opts.side == "openvino":
        import openvino_peer
        pipe = load_peer(torch.float32)
        seconds = openvino_peer.patch_pipeline(pipe, opts.size, opts.precision, opts.threads)
        print(f"OpenVINO conversion and compilation: {seconds:.0f} s")
    else:
        pipe = load_peer(PRECISIONS[opts.precision])
    memory = PeakMemory()
    if opts.warmup:
        run_peer_once(pipe, argparse.Namespace(**{**vars(opts), "steps": 1}))
    total = median([run_peer_once(pipe, opts)["total"] for _ in range(opts.repeats)])
    print(f"peer ({'diffusers' if opts.side == 'peer' else 'diffusers + OpenVINO'}), sd2-base, {opts.precision}, {opts.size}x{opts.size}, {opts.steps} "
          f"steps ddim, guidance {opts.scale}, {torch.get_num_threads()} threads, "
          f"{memory.report()}")
    print(format_table(["part", "seconds", "share"], [["total", f"{total:.3f}", "100.00%"]]))


if __name__ == "__main__":
    main()
