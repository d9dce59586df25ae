"""The scripts' shared command line: flags -> SamplingOptions, model loading, the batch loop,
numbered PNGs with their parameters, --from-png regeneration, one-line errors (exit status 2).

Each script (txt2img, img2img, inpaint, upscale) is a Task: its own flags, input pictures,
option fields and generate function; everything else is here, once.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ldm.checkpoint import file_sha256
from ldm.inference.options import SamplingOptions
from ldm.inference.outputs import (UsageError, load_image, make_grid, png_info,
                                   read_png_parameters, write_new_png)

if TYPE_CHECKING:
    from ldm.inference.sampling import Callback
    from ldm.pipeline import Pipeline

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "shapes.safetensors"
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
REQUIRED_PARAMETERS = {"prompt": str, "negative_prompt": str, "batch_seed": int, "batch_size": int,
                       "index": int, "steps": int, "sampler": str, "scale": (int, float),
                       "height": int, "width": int}
# Editing fields of SamplingOptions: recorded in every PNG and restored by --from-png.
EDIT_FIELDS = ("strength", "noise_level", "mask_dilate", "mask_feather", "keep_unmasked",
               "hr_scale", "hr_strength", "hr_upscale", "classifier", "classifier_labels",
               "classifier_scale")
Inputs = dict[str, Any]
Generate = Callable[["Pipeline", SamplingOptions, Inputs, "Callback"], list[Image.Image]]
Prepare = Callable[["Pipeline", SamplingOptions, Inputs, argparse.Namespace], SamplingOptions]


@dataclass(frozen=True)
class Task:
    """One script: name, default output folder, its own flags, pictures and options, generate.

    images: (attribute, flag, PIL mode) of the input pictures, loaded before the model and
    recorded (path and SHA-256) in every PNG; those named in `optional` may be left out
    (None in the inputs). recorded: other flags stored and restored (the
    editing fields of SamplingOptions always are, into the flags of the same name).
    options: the SamplingOptions fields its flags set. prepare: options checked against the
    model before any work (default: resolve). generate: the images of one batch.
    """
    name: str
    doc: str
    generate: Generate
    add_flags: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    images: tuple[tuple[str, str, str], ...] = ()
    optional: tuple[str, ...] = ()
    recorded: tuple[str, ...] = ()
    options: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}
    prepare: Prepare | None = None
    prompt_required: bool = True


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_args(task: Task, argv: list[str] | None) -> argparse.Namespace:
    """The shared flags (SD's txt2img.py names) plus the task's own."""
    from ldm.diffusion.samplers import SAMPLERS
    p = Parser(description=task.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the uncond text)")
    p.add_argument("--from-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--from-png", default=None, help="regenerate the image whose PNG parameters these are")
    p.add_argument("--outdir", default=f"outputs/{task.name}-samples", help="output folder")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="sampler (default ddim)")
    p.add_argument("--ddim_eta", type=float, default=None,
                   help="stochasticity for ddim / euler_a (default: 0 for ddim, 1 for euler_a)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's or input's size)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model's or input's size)")
    p.add_argument("--n_samples", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--n_iter", type=int, default=1, help="batches per prompt (default 1)")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default n_samples)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image (default 42)")
    p.add_argument("--ckpt", default=None, help=f"checkpoint (default: the embedded {DEFAULT_MODEL.name})")
    p.add_argument("--config", default=None, help="model config: our YAML or SD's inference YAML")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="auto (default): bf16 on CPUs with native bf16 (avx512_bf16 or amx_bf16), "
                        "fp32 on other CPUs, fp16 on CUDA; or fp32, bf16, fp16 (CUDA only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--vae-tile", type=int, default=None,
                   help="VAE work in overlapping N x N latent tiles (bounded memory, seamless); 0 = one "
                        "pass; default: tiles of 64 when the latent is larger than 96 on a side")
    p.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="do not measure the convolutions on this machine (memory format, "
                        "oneDNN-packed weights, folded or direct upsampling, Winograd per fp32 "
                        "layer; first use of a model, remembered in ~/.cache/ldm): use "
                        "channels_last, unpacked, folded, direct, e.g. for reproducible "
                        "benchmarks")
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="what runs the U-Net and VAE decoder: torch (default), or openvino (CPU "
                        "only; needs pip install -e '.[openvino]'; first use of a model converts "
                        "it, minutes at SD size, once: kept in ~/.cache/ldm/openvino; --precision "
                        "is its precision hint)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net with frozen weights (inductor); the first "
                        "call compiles (about a minute on a CPU), later steps run faster")
    p.add_argument("--classifier", default=None,
                   help="classifier guidance: a latent classifier (scripts/train_classifier.py)")
    p.add_argument("--class", dest="classifier_labels", default="",
                   help='classifier guidance: classes to steer toward, e.g. "color=red,shape=circle,bg=blue"')
    p.add_argument("--classifier-scale", type=float, default=0.0,
                   help="classifier guidance scale s (eps - s sqrt(1 - abar_t) grad log p; default 0: off)")
    task.add_flags(p)
    return p.parse_args(argv)


def sampling_options(task: Task, args: argparse.Namespace) -> SamplingOptions:
    """The flags' sampling options (validated as they are built); the prompt is set per batch."""
    return SamplingOptions(negative_prompt=args.negative_prompt, steps=args.steps,
                           sampler=args.sampler, eta=args.ddim_eta, guidance_scale=args.scale,
                           height=args.H, width=args.W, seed=args.seed,
                           num_images=args.n_samples, vae_tile=args.vae_tile,
                           classifier=args.classifier, classifier_labels=args.classifier_labels,
                           classifier_scale=args.classifier_scale, **task.options(args))


def check_openvino(args: argparse.Namespace) -> None:
    """--backend openvino: installed, on the CPU, not combined with torch-only flags."""
    from ldm.inference.openvino_backend import available
    if not available():
        raise UsageError("--backend openvino needs the openvino package: "
                         "pip install -e '.[openvino]'")
    if args.device == "cuda":
        raise UsageError("--backend openvino runs on the CPU (drop --device cuda)")
    args.device = "cpu"
    for flag, name in (("--compile", "compile"), ("--cuda-graph", "cuda_graph")):
        if getattr(args, name, False):
            raise UsageError(f"{flag} is for the torch backend (drop it with --backend openvino)")


def validate(task: Task, args: argparse.Namespace) -> list[str]:
    """Checks of the shared flags that need no model; returns the prompts."""
    import torch
    for name in ("n_samples", "n_iter"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows must be >= 0, got {args.n_rows}")
    if args.backend == "openvino":
        check_openvino(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.precision == "auto":
        from ldm.inference.setup import default_precision
        args.precision = default_precision(args.device)  # recorded concretely in every PNG
    if args.precision == "fp16" and args.device == "cpu":
        raise UsageError("--precision fp16 needs CUDA; on the CPU use fp32 or bf16")
    if getattr(args, "cuda_graph", False) and args.device != "cuda":
        raise UsageError("--cuda-graph needs a CUDA device (drop it on the CPU)")
    if args.from_file is not None:
        try:
            lines = Path(args.from_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--from-file {args.from_file}: cannot read it ({err})") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--from-file {args.from_file}: contains no prompts")
        return prompts
    if args.prompt is None or not args.prompt.strip():
        if task.prompt_required:
            raise UsageError("give a non-empty --prompt, --from-file or --from-png")
        return [args.prompt or ""]
    return [args.prompt]


def load_inputs(task: Task, args: argparse.Namespace) -> tuple[Inputs, dict[str, Any]]:
    """(pictures by attribute, their PNG record): each loaded, and checked against the hash
    stored in the PNG when regenerating."""
    inputs, record = {}, {}
    expected = getattr(args, "expected_inputs", {})
    for attr, flag, mode in task.images:
        path = getattr(args, attr)
        if path is None:
            if attr in task.optional:
                inputs[attr] = None
                continue
            raise UsageError(f"give {flag} (a picture file)")
        inputs[attr] = load_image(path, flag, mode)
        digest = file_sha256(path)
        if attr in expected and expected[attr] != digest:
            raise UsageError(f"--from-png: {flag} {path} is not the picture the image was made "
                             f"from (its SHA-256 differs)")
        record[attr] = {"path": str(Path(path).resolve()), "sha256": digest}
    return inputs, record


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint to load: --ckpt, or the embedded default model."""
    if args.ckpt is None:
        if not DEFAULT_MODEL.is_file():
            raise UsageError(f"no --ckpt given and the embedded default model {DEFAULT_MODEL} is "
                             "not there; pass --ckpt MODEL.safetensors")
        return DEFAULT_MODEL
    path = Path(args.ckpt)
    if not path.is_file():
        raise UsageError(f"--ckpt {path}: no such file")
    return path


def apply_png_parameters(task: Task, args: argparse.Namespace, params: dict) -> None:
    """Make args regenerate exactly the batch the PNG came from."""
    made_by = params.get("task", "txt2img")
    if made_by != task.name:
        raise UsageError(f"--from-png {args.from_png}: made by {made_by}.py, not {task.name}.py")
    args.prompt, args.negative_prompt = params["prompt"], params.get("negative_prompt", "")
    args.from_file = None
    args.seed, args.n_samples, args.n_iter = params["batch_seed"], params["batch_size"], 1
    args.steps, args.sampler, args.scale = params["steps"], params["sampler"], params["scale"]
    args.ddim_eta, args.H, args.W = params.get("eta"), params["height"], params["width"]
    args.precision = params.get("precision", args.precision)
    args.backend = params.get("backend", "torch")
    args.config = args.config or params.get("config")
    if args.ckpt is None and params.get("model") and Path(params["model"]).is_file():
        args.ckpt = params["model"]
    args.vae_tile = params.get("vae_tile", 0)  # a PNG without the key was decoded in one pass
    args.only_index = params["index"]
    args.expected_hash = params.get("model_hash")
    inputs = params.get("inputs", {})
    args.expected_inputs = {}
    for attr, flag, _ in task.images:
        entry = inputs.get(attr)
        if entry is None and attr in task.optional:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UsageError(f"--from-png {args.from_png}: records no {flag} picture")
        setattr(args, attr, entry["path"])
        args.expected_inputs[attr] = entry.get("sha256")
    for name in (*EDIT_FIELDS, *task.recorded):
        if name in params and hasattr(args, name):
            setattr(args, name, params[name])


def load_model(args: argparse.Namespace, ckpt: Path, model_hash: str) -> "Pipeline":
    """The pipeline on args' device and precision, prepared for inference."""
    import torch

    from ldm.inference.setup import load_pipeline, prepare_pipeline
    from ldm.runtime import setup_cpu
    if getattr(args, "expected_hash", None) and args.expected_hash != model_hash:
        raise UsageError(f"--from-png: the image was made with model {args.expected_hash[:12]}, "
                         f"but {ckpt} is {model_hash[:12]} (pass the matching --ckpt)")
    dtype = getattr(torch, PRECISIONS[args.precision])
    if args.backend == "openvino":  # OpenVINO makes its own kernel and memory choices
        setup_cpu(allocator=False)
        return load_pipeline(ckpt, config=args.config, device=args.device, dtype=dtype,
                             backend="openvino")
    pipe = load_pipeline(ckpt, config=args.config, device=args.device, dtype=dtype, prepare=False)
    setup_cpu(dtype=dtype)  # keep freed activations mapped between steps (glibc mallopt)
    # Layout measured once per machine (channels_last, unpacked, folded, direct with
    # --no-autotune).
    prepare_pipeline(pipe, compile=args.compile, autotune=args.autotune)
    return pipe


def run(task: Task, args: argparse.Namespace) -> None:
    """Generate and write every batch."""
    import torch
    from tqdm import tqdm

    import ldm
    from ldm.inference.distributed import local_batches
    from ldm.inference.options import resolve
    from ldm.inference.setup import prepare_size
    from ldm.inference.sampling import task_steps
    prompts = validate(task, args)
    options = sampling_options(task, args)
    inputs, record = load_inputs(task, args)
    ckpt = resolve_checkpoint(args)
    model_hash = file_sha256(ckpt)
    outdir, only = Path(args.outdir), getattr(args, "only_index", None)
    samples = outdir / "samples"
    # Under torchrun: this rank's share of the batches, file numbers fixed before any work.
    batches = local_batches(prompts, args.n_iter, options.seed, options.num_images, only,
                            samples, outdir, args.device)
    pipe = load_model(args, ckpt, model_hash)
    options = (task.prepare or (lambda p, o, i, a: resolve(o, p)))(pipe, options, inputs, args)
    if not args.compile and args.backend == "torch":  # a compiled U-Net keeps its plans
        prepare_size(pipe, options.height, options.width, options.vae_tile,
                     autotune=args.autotune)
    common = {"task": task.name, "negative_prompt": options.negative_prompt,
              "sampler": options.sampler, "steps": options.steps,
              "scale": options.guidance_scale, "eta": options.eta, "height": options.height,
              "width": options.width, "batch_size": options.num_images, "model": str(ckpt),
              "model_hash": model_hash, "config": args.config, "precision": args.precision,
              "backend": args.backend,
              "ldm_version": ldm.__version__, "torch_version": torch.__version__,
              "vae_tile": options.vae_tile, "inputs": record,
              **{name: getattr(options, name) for name in EDIT_FIELDS},
              **{name: getattr(args, name) for name in task.recorded}}
    written = []
    for job in batches:
        prompt, seed = job.prompt, job.seed
        batch = replace(options, prompt=prompt, seed=seed)
        with tqdm(total=task_steps(pipe, batch), desc=f"seed {seed}", leave=False) as bar:
            images = task.generate(pipe, batch, inputs, lambda i, x, d: bar.update(1))
        samples.mkdir(parents=True, exist_ok=True)  # only once there is something to write
        for k, image in enumerate(images):
            if only is not None and k != only:
                continue
            params = {"prompt": prompt, "seed": seed + k, "batch_seed": seed, "index": k, **common}
            written.append(write_new_png(samples, "{:05d}.png", image, png_info(params),
                                         job.sample_numbers.get(k)))
        if only is None:
            grid = make_grid(images, args.n_rows)
            info = png_info({"prompt": prompt, "batch_seed": seed, **common})
            written.append(write_new_png(outdir, "grid-{:04d}.png", grid, info, job.grid_number))
    print(f"wrote {len(written)} file(s): " + ", ".join(str(p) for p in written))


def main(task: Task, argv: list[str] | None = None) -> int:
    """A script's entry point; bad input -> one line on stderr, exit status 2."""
    from ldm.errors import LdmError
    try:
        args = parse_args(task, argv)
        if args.from_png is not None:
            apply_png_parameters(task, args, read_png_parameters(args.from_png, REQUIRED_PARAMETERS))
        run(task, args)
    except (UsageError, LdmError, ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{task.name}.py: error: {message}", file=sys.stderr)
        return 2
    return 0
