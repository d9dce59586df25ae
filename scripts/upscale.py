"""x4 upscaling with SD's latent upscaler (e.g. x4-upscaler-ema.ckpt with configs/x4-upscaler.yaml).

    python scripts/upscale.py --ckpt x4-upscaler-ema.ckpt --config configs/x4-upscaler.yaml \
        --image small.png --prompt "a photograph of a cat" --noise-level 20

The low-res picture is noised to --noise-level (0 keeps it exactly; higher lets the model
invent more detail) and given to the U-Net beside the latent, which has the picture's size:
the result is the VAE factor (4) times larger. The prompt may be empty. Output, PNG parameters
and --from-png as txt2img.py. Bad input is one line on stderr and exit status 2.
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
    """upscale's own flags."""
    p.add_argument("--image", default=None, help="the low-res picture")
    p.add_argument("--noise-level", type=int, default=None,
                   help="augmentation noise level of the low-res picture (default 20; the "
                        "model's range, 0..350 for SD's upscaler)")


def prepare(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
            args: argparse.Namespace) -> "SamplingOptions":
    """Options bound to the upscaler: output size and noise level."""
    from ldm.inference.upscale import resolve_upscale
    return resolve_upscale(opts, pipe, inputs["image"])


def generate(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
             callback: "Callback") -> "list[Image.Image]":
    """One batch of upscaled images."""
    from ldm.inference import upscale
    return upscale(pipe, opts, inputs["image"], callback=callback)


TASK = Task(name="upscale", doc=__doc__, generate=generate, add_flags=add_flags,
            images=(("image", "--image", "RGB"),),
            options=lambda args: {"noise_level": args.noise_level}, prepare=prepare,
            prompt_required=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input -> one line on stderr, exit status 2."""
    return run_task(TASK, argv)


if __name__ == "__main__":
    sys.exit(main())
