"""Text to image with a latent diffusion checkpoint (flags as in Stable Diffusion's txt2img.py).

    python scripts/txt2img.py --prompt "a red circle on a blue background"
    python scripts/txt2img.py --ckpt model.safetensors --config v2-inference.yaml --prompt "..."
    python scripts/txt2img.py --from-png outputs/txt2img-samples/samples/00003.png

Writes outdir/samples/NNNNN.png (never overwriting) and outdir/grid-NNNN.png per batch. Each
PNG carries its generation parameters as JSON in the text chunk "parameters"; --from-png
regenerates that image bit for bit on the same machine and software. Image k of a batch uses
seed + k. Bad input is one line on stderr and exit status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PARAMETERS_KEY = "parameters"

if TYPE_CHECKING:
    from ldm.inference import SamplingOptions


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    from ldm.diffusion.samplers import SAMPLERS
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the uncond text)")
    p.add_argument("--from-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--from-png", default=None, help="regenerate the image whose PNG parameters these are")
    p.add_argument("--outdir", default="outputs/txt2img-samples", help="output folder")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="sampler (default ddim)")
    p.add_argument("--ddim_eta", type=float, default=None,
                   help="stochasticity for ddim / euler_a (default: 0 for ddim, 1 for euler_a)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's native size)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model's native size)")
    p.add_argument("--n_samples", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--n_iter", type=int, default=1, help="batches per prompt (default 1)")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default n_samples)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image (default 42)")
    p.add_argument("--ckpt", default=None, help=f"checkpoint (default: the embedded {DEFAULT_MODEL.name})")
    p.add_argument("--config", default=None, help="model config: our YAML or SD's inference YAML")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="fp32, bf16, fp16 (CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--vae-tile", type=int, default=None,
                   help="decode in overlapping N x N latent tiles (bounded memory, seamless); 0 = one "
                        "pass; default: tiles of 64 when the latent is larger than 96 on a side")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net with frozen weights (inductor); the first "
                        "call compiles (about a minute on a CPU), later steps run faster "
                        "(SD U-Net here: fp32 0.65x of eager, bf16 0.72-0.89x)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: capture the whole sampling loop once as a CUDA graph and replay it")
    return p.parse_args(argv)


def read_png_parameters(path: str) -> dict:
    """The generation parameters stored in a PNG made by this script."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            text = image.text.get(PARAMETERS_KEY) if hasattr(image, "text") else None
    except (OSError, ValueError) as err:
        raise UsageError(f"--from-png {path}: cannot read it as a PNG ({err})") from None
    if text is None:
        raise UsageError(f"--from-png {path}: has no '{PARAMETERS_KEY}' text chunk (not made by txt2img.py)")
    types = {"prompt": str, "negative_prompt": str, "batch_seed": int, "batch_size": int,
             "index": int, "steps": int, "sampler": str, "scale": (int, float),
             "height": int, "width": int}
    try:
        params = json.loads(text)
        valid = all(isinstance(params[key], kind) for key, kind in types.items())
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid or not 0 <= params["index"] < params["batch_size"]:
        raise UsageError(f"--from-png {path}: its '{PARAMETERS_KEY}' chunk is not valid")
    return params


def apply_png_parameters(args: argparse.Namespace, params: dict) -> None:
    """Make args regenerate exactly the batch the PNG came from."""
    args.prompt, args.negative_prompt = params["prompt"], params.get("negative_prompt", "")
    args.seed, args.n_samples, args.n_iter = params["batch_seed"], params["batch_size"], 1
    args.steps, args.sampler, args.scale = params["steps"], params["sampler"], params["scale"]
    args.ddim_eta, args.H, args.W = params.get("eta"), params["height"], params["width"]
    args.precision = params.get("precision", args.precision)
    args.config = args.config or params.get("config")
    if args.ckpt is None and params.get("model") and Path(params["model"]).is_file():
        args.ckpt = params["model"]
    args.vae_tile = params.get("vae_tile", 0)  # PNGs from before the flag were decoded in one pass
    args.only_index = params["index"]


def sampling_options(args: argparse.Namespace) -> "SamplingOptions":
    """The flags' sampling options (validated as they are built); the prompt is set per batch."""
    from ldm.inference import SamplingOptions
    return SamplingOptions(negative_prompt=args.negative_prompt, steps=args.steps,
                           sampler=args.sampler, eta=args.ddim_eta, guidance_scale=args.scale,
                           height=args.H, width=args.W, seed=args.seed,
                           num_images=args.n_samples, vae_tile=args.vae_tile)


def validate(args: argparse.Namespace) -> list[str]:
    """Checks of the CLI's own flags that need no model; returns the prompts."""
    import torch
    for name in ("n_samples", "n_iter"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows must be >= 0, got {args.n_rows}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
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
        raise UsageError("give a non-empty --prompt, --from-file or --from-png")
    return [args.prompt]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the model hash stored in every PNG)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint to load: --ckpt, or the embedded default model."""
    if args.ckpt is None:
        if not DEFAULT_MODEL.is_file():
            raise UsageError(f"no --ckpt given and the embedded default model {DEFAULT_MODEL} is "
                             "not there yet; pass --ckpt MODEL.safetensors")
        return DEFAULT_MODEL
    path = Path(args.ckpt)
    if not path.is_file():
        raise UsageError(f"--ckpt {path}: no such file")
    return path


def write_new_png(folder: Path, name_format: str, image, info) -> Path:
    """Write image under the next free number in folder, atomically and never overwriting."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    number = 1 + max((int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()), default=-1)
    tmp = folder / f".tmp-{os.getpid()}.png"
    tmp.write_bytes(buffer.getvalue())
    try:
        while True:
            path = folder / name_format.format(number)
            try:
                os.link(tmp, path)  # fails if the name exists: never overwrites
                return path
            except FileExistsError:
                number += 1
    finally:
        tmp.unlink()


def make_grid(images: list, n_rows: int):
    """Images side by side, n_rows per row (SD's --n_rows is images per row)."""
    from PIL import Image
    cols = n_rows or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, image in enumerate(images):
        grid.paste(image, ((k % cols) * w, (k // cols) * h))
    return grid


def run(args: argparse.Namespace) -> None:
    """Generate and write every batch."""
    from dataclasses import replace

    import torch
    from PIL.PngImagePlugin import PngInfo
    from tqdm import tqdm

    import ldm
    from ldm.inference import resolve, txt2img
    prompts = validate(args)
    options = sampling_options(args)
    ckpt = resolve_checkpoint(args)
    model_hash = file_sha256(ckpt)
    if getattr(args, "expected_hash", None) and args.expected_hash != model_hash:
        raise UsageError(f"--from-png: the image was made with model {args.expected_hash[:12]}, "
                         f"but {ckpt} is {model_hash[:12]} (pass the matching --ckpt)")
    dtype = getattr(torch, PRECISIONS[args.precision])
    pipe = ldm.load_pipeline(ckpt, config=args.config, device=args.device, dtype=dtype)
    options = resolve(options, pipe)  # checked against the model before any work
    from ldm.runtime import prepare_pipeline, setup_cpu
    setup_cpu(dtype=dtype)  # keep freed activations mapped between steps (glibc mallopt)
    prepare_pipeline(pipe, compile=getattr(args, "compile", False))  # channels_last convolutions
    outdir, only = Path(args.outdir), getattr(args, "only_index", None)
    samples = outdir / "samples"
    common = {"negative_prompt": options.negative_prompt, "sampler": options.sampler,
              "steps": options.steps, "scale": options.guidance_scale, "eta": options.eta,
              "height": options.height, "width": options.width, "batch_size": options.num_images,
              "model": str(ckpt), "model_hash": model_hash, "config": args.config,
              "precision": args.precision, "ldm_version": ldm.__version__,
              "torch_version": torch.__version__, "vae_tile": options.vae_tile}
    written, seed = [], options.seed
    graphs = None
    if getattr(args, "cuda_graph", False):
        from ldm.inference.cuda_graph import SamplingGraphs
        graphs = SamplingGraphs(pipe)  # captured once per shape, replayed for every batch
    for prompt in prompts:
        for _ in range(args.n_iter):
            batch = replace(options, prompt=prompt, seed=seed)
            with tqdm(total=batch.steps, desc=f"seed {seed}", leave=False) as bar:
                images = txt2img(pipe, batch, callback=lambda i, x, d: bar.update(1), graphs=graphs)
            samples.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            for k, image in enumerate(images):
                if only is not None and k != only:
                    continue
                params = {"prompt": prompt, "seed": seed + k, "batch_seed": seed, "index": k, **common}
                info = PngInfo()
                info.add_text(PARAMETERS_KEY, json.dumps(params))
                written.append(write_new_png(samples, "{:05d}.png", image, info))
            if only is None:
                info = PngInfo()
                info.add_text(PARAMETERS_KEY, json.dumps({"prompt": prompt, "batch_seed": seed, **common}))
                written.append(write_new_png(outdir, "grid-{:04d}.png", make_grid(images, args.n_rows), info))
            seed += options.num_images
    print(f"wrote {len(written)} file(s): " + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input -> one line on stderr, exit status 2."""
    from ldm.errors import LdmError
    try:
        args = parse_args(argv)
        if args.from_png is not None:
            params = read_png_parameters(args.from_png)
            args.expected_hash = params.get("model_hash")
            apply_png_parameters(args, params)
        run(args)
    except (UsageError, LdmError, ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"txt2img.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
