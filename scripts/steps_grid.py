"""A steps-comparison grid: one row per (model, steps), one column per prompt, same seeds.

Each row is `LABEL=CHECKPOINT@STEPS`; every checkpoint samples as its config says (a distilled
student on its trailing grid with its guidance built in, a plain model with DDIM and
classifier-free guidance 7.5). Prints the wall time of each row's images.

    python scripts/steps_grid.py --out docs/distill_steps.png \\
        --row "teacher 8=ldm/assets/shapes.safetensors@8" \\
        --row "student 8=runs/distill/student-8steps.safetensors@8"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from PIL import Image, ImageDraw  # noqa: E402

PROMPTS = ("a red circle on a blue background", "a green square on a yellow background",
           "a blue triangle on a white background", "a yellow circle on a purple background")
LABEL_WIDTH = 110


def parse_row(text: str) -> tuple[str, Path, int]:
    """'LABEL=CHECKPOINT@STEPS' -> (label, checkpoint, steps); ValueError when malformed."""
    label, sep, rest = text.partition("=")
    path, at, steps = rest.rpartition("@")
    if not (sep and at and label and path and steps.isdigit() and int(steps) > 0):
        raise ValueError(f"--row must be LABEL=CHECKPOINT@STEPS, got {text!r}")
    if not Path(path).is_file():
        raise ValueError(f"checkpoint not found: {path}")
    return label, Path(path), int(steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", required=True,
                   help="LABEL=CHECKPOINT@STEPS, once per row, top to bottom")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"a column's prompt (repeatable; default: {len(PROMPTS)} shapes prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed of column i is seed + i (default 0)")
    p.add_argument("--out", required=True, help="PNG file to write")
    return p.parse_args(argv)


def render(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """Rows of equal-size images with their labels on the left."""
    w, h = rows[0][1][0].size
    sheet = Image.new("RGB", (LABEL_WIDTH + w * len(rows[0][1]), h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * h + h // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image, (LABEL_WIDTH + c * w, r * h))
    return sheet


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        specs = [parse_row(text) for text in args.row]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import ldm
    prompts = tuple(args.prompt or PROMPTS)
    rows = []
    for label, ckpt, steps in specs:
        pipe = ldm.load_pipeline(str(ckpt))
        options = ldm.SamplingOptions(prompt=prompts, steps=steps, seed=args.seed)
        start = time.perf_counter()
        images = ldm.txt2img(pipe, options)
        print(f"{label}: {len(images)} images in {time.perf_counter() - start:.2f} s", flush=True)
        rows.append((label, images))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    render(rows).save(tmp)
    tmp.replace(out)  # never a half-written picture
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
