"""Image to image (SDEdit) with a latent diffusion checkpoint (flags as SD's img2img.py).

    python scripts/img2img.py --init-img red_circle.png --prompt "a green circle on a blue background"
    python scripts/img2img.py --init-img photo.png --prompt "..." --strength 0.6 --sampler euler_a

The picture is resized to a multiple of the model's latent factor (or to --H/--W), encoded,
noised to --strength (0 keeps it, 1 redraws it: int(strength * steps) steps are run) and
denoised toward the prompt. Output, PNG parameters and --from-png as txt2img.py; the PNG records
the input picture's path and SHA-256. Bad input is one line on stderr and exit status 2.
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
    """img2img's own flags."""
    p.add_argument("--init-img", default=None, help="the picture to start from")
    p.add_argument("--strength", type=float, default=0.75,
                   help="how much to change it, in (0, 1] (default 0.75)")


def prepare(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
            args: argparse.Namespace) -> "SamplingOptions":
    """Options bound to the model and the picture's size."""
    from ldm.inference.conditioning import require_conditioning
    from ldm.inference.img2img import resolve_for_image
    require_conditioning(pipe, "crossattn")
    return resolve_for_image(opts, pipe, inputs["init_img"])


def generate(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
             callback: "Callback") -> "list[Image.Image]":
    """One batch of edits."""
    from ldm.inference import img2img
    return img2img(pipe, opts, inputs["init_img"], callback=callback)


TASK = Task(name="img2img", doc=__doc__, generate=generate, add_flags=add_flags,
            images=(("init_img", "--init-img", "RGB"),),
            options=lambda args: {"strength": args.strength}, prepare=prepare)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input -> one line on stderr, exit status 2."""
    return run_task(TASK, argv)


if __name__ == "__main__":
    sys.exit(main())
