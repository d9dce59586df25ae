"""Inpainting and outpainting with a latent diffusion checkpoint.

    python scripts/inpaint.py --image scene.png --mask mask.png --prompt "a yellow background"
    python scripts/inpaint.py --image scene.png --pad-left 16 --pad-right 16 --prompt "..."

White mask pixels are repainted, black ones kept (grey: above half is repainted by the
inpainting model; text-to-image models blend in proportion). Any text-to-image model works by
latent blending (the kept region is reset to the original, noised to the current level, before
every step); SD's inpainting checkpoint (with its config, e.g. configs/sd2-inpainting.yaml)
sees the mask and the masked picture directly. --pad-* grows the canvas and paints the new
border (outpainting; no --mask then). --strength starts from the noised original instead of
noise. Output, PNG parameters and --from-png as txt2img.py. Bad input: one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ldm.inference.cli import Task, UsageError, main as run_task  # noqa: E402

if TYPE_CHECKING:
    from PIL import Image

    from ldm.inference.cli import Inputs
    from ldm.inference.sampling import Callback
    from ldm.inference.options import SamplingOptions
    from ldm.pipeline import Pipeline

PADS = ("pad_left", "pad_right", "pad_top", "pad_bottom")


def add_flags(p: argparse.ArgumentParser) -> None:
    """inpaint's own flags."""
    p.add_argument("--image", default=None, help="the picture to edit")
    p.add_argument("--mask", default=None, help="white = repaint, black = keep (same size as --image)")
    p.add_argument("--mask-dilate", type=int, default=0, help="grow the mask by N pixels")
    p.add_argument("--mask-feather", type=int, default=0, help="soften the mask edge over N pixels")
    p.add_argument("--keep-unmasked", action="store_true",
                   help="paste the original pixels back outside the mask after decoding")
    p.add_argument("--strength", type=float, default=None,
                   help="start from the original noised to this strength in (0, 1] (default: from noise)")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--pad-{side}", type=int, default=0, help=f"outpaint N pixels on the {side}")


def options(args: argparse.Namespace) -> dict[str, object]:
    """The SamplingOptions fields of the flags."""
    return {"strength": args.strength, "mask_dilate": args.mask_dilate,
            "mask_feather": args.mask_feather, "keep_unmasked": args.keep_unmasked}


def canvas(inputs: dict, args: argparse.Namespace) -> tuple:
    """(image, mask) to inpaint: the given pair, or the padded canvas and its border mask."""
    from ldm.inference.masks import check_same_size, pad_canvas
    pads = [getattr(args, name) for name in PADS]
    if any(p < 0 for p in pads):
        raise UsageError(f"--pad-* must be >= 0 pixels, got {pads}")
    if any(pads):
        if inputs.get("mask") is not None:
            raise UsageError("give either --mask or --pad-* (outpainting makes its own mask)")
        return pad_canvas(inputs["image"], *pads)
    if inputs.get("mask") is None:
        raise UsageError("give --mask (white = repaint) or a --pad-* border to outpaint")
    check_same_size(inputs["image"], inputs["mask"])
    return inputs["image"], inputs["mask"]


def prepare(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
            args: argparse.Namespace) -> "SamplingOptions":
    """Options bound to the model and the canvas (padded when outpainting)."""
    from ldm.inference.conditioning import require_conditioning
    from ldm.inference.img2img import resolve_for_image
    require_conditioning(pipe, "crossattn", "inpaint")
    inputs["canvas"] = canvas(inputs, args)
    return resolve_for_image(opts, pipe, inputs["canvas"][0])


def generate(pipe: "Pipeline", opts: "SamplingOptions", inputs: "Inputs",
             callback: "Callback") -> "list[Image.Image]":
    """One batch of inpainted images."""
    from ldm.inference import inpaint
    image, mask = inputs["canvas"]
    return inpaint(pipe, opts, image, mask, callback=callback)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input -> one line on stderr, exit status 2."""
    return run_task(TASK, argv)


TASK = Task(name="inpaint", doc=__doc__, generate=generate, add_flags=add_flags,
            images=(("image", "--image", "RGB"), ("mask", "--mask", "L")),
            optional=("mask",), recorded=PADS, options=options, prepare=prepare)

if __name__ == "__main__":
    sys.exit(main())
