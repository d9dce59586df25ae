"""Text to image with a latent diffusion checkpoint (flags as in Stable Diffusion's txt2img.py).

    python scripts/txt2img.py --prompt "a red circle on a blue background"
    python scripts/txt2img.py --ckpt model.safetensors --config v2-inference.yaml --prompt "..."
    python scripts/txt2img.py --prompt "..." --hr-scale 2 --hr-strength 0.5
    python scripts/txt2img.py --from-png outputs/txt2img-samples/samples/00003.png

Writes outdir/samples/NNNNN.png (never overwriting) and outdir/grid-NNNN.png per batch. Each
PNG carries its generation parameters as JSON in the text chunk "parameters"; --from-png
regenerates that image bit for bit on the same machine and software. Image k of a batch uses
seed + k. Bad input is one line on stderr and exit status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ldm.inference.cli import Task, main as run_task  # noqa: E402

if TYPE_CHECKING:
    from PIL import Image

    from ldm.inference import SamplingOptions
    from ldm.inference.cli import Inputs
    from ldm.inference.sampling import Callback
    from ldm.pipeline import Pipeline


def add_flags(p: argparse.ArgumentParser) -> None:
    """txt2img's own flags: CUDA graphs and the hires fix."""
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: capture the whole sampling loop once as a CUDA graph and replay it")
    p.add_argument("--hr-scale", type=float, default=None,
                   help="hires fix: generate at --H/--W, upscale by this factor (in (1, 4]) and "
                        "re-run img2img at the larger size")
    p.add_argument("--hr-strength", type=float, default=0.5,
                   help="hires fix: img2img strength of the second pass (default 0.5)")
    p.add_argument("--hr-upscale", default="latent", choices=["latent", "pixels"],
                   help="hires fix: upscale the latent (bilinear) or the decoded image (Lanczos)")


def options(args: argparse.Namespace) -> dict[str, object]:
    """The hires fix fields of SamplingOptions."""
    return {"hr_scale": args.hr_scale, "hr_strength": args.hr_strength,
            "hr_upscale": args.hr_upscale}


def prepare(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
            args: argparse.Namespace) -> "SamplingOptions":
    """Checked against the model (the hires pass's size too); CUDA graphs set up once."""
    from dataclasses import replace

    from ldm.inference import resolve
    from ldm.inference.conditioning import require_conditioning
    from ldm.inference.txt2img import hires_options
    require_conditioning(pipe, "crossattn")
    if args.cuda_graph:
        from ldm.inference.cuda_graph import SamplingGraphs
        inputs["graphs"] = SamplingGraphs(pipe)  # captured once per shape, replayed every batch
    if opts.hr_scale is None:
        return resolve(opts, pipe)
    hires_options(opts, pipe)  # the larger size is checked now, before any work
    # The base size is fixed; VAE tiling stays per size (automatic unless given).
    return replace(resolve(opts, pipe), vae_tile=opts.vae_tile)


def generate(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
             callback: "Callback") -> "list[Image.Image]":
    """One batch of images."""
    from ldm.inference import txt2img
    return txt2img(pipe, opts, callback=callback, graphs=inputs.get("graphs"))


TASK = Task(name="txt2img", doc=__doc__, generate=generate, add_flags=add_flags, options=options,
            prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input -> one line on stderr, exit status 2."""
    return run_task(TASK, argv)


if __name__ == "__main__":
    sys.exit(main())
