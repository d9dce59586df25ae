"""Write the synthetic shapes dataset as an image folder (NNNNNN.png + NNNNNN.txt captions)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ldm.data.shapes import HELD_OUT_TRIPLES, ShapesDataset, validate_triples, write_folder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--num", type=int, default=30000, help="number of images (default 30000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed: same seed, same images (default 0)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--exclude", action="append", default=[], metavar="COLOR,SHAPE,BACKGROUND",
                   help="leave this triple out (repeatable), e.g. --exclude red,triangle,blue")
    p.add_argument("--include-held-out", action="store_true",
                   help="also draw the 8 held-out triples (left out by default, as the default model is)")
    p.add_argument("--no-paraphrase", action="store_true",
                   help="only the canonical caption 'a {color} {shape} on a {background} background'")
    p.add_argument("--crop", type=int, default=None, metavar="N",
                   help="write a random N x N crop of each image (a cheap autoencoder training set)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate flags, then write the folder."""
    args = parse_args(argv)
    try:
        exclude = validate_triples(item.split(",") for item in args.exclude)
        if not args.include_held_out:
            exclude += list(HELD_OUT_TRIPLES)
        dataset = ShapesDataset(args.num, seed=args.seed, size=args.size, exclude=exclude,
                                paraphrase=not args.no_paraphrase)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.crop is not None and not 0 < args.crop <= args.size:
        print(f"error: --crop must be between 1 and --size ({args.size}), got {args.crop}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"error: --out {out} is not empty (pass --overwrite to write into it)", file=sys.stderr)
        return 2
    count = write_folder(out, dataset, progress=not args.quiet, crop=args.crop)
    print(f"wrote {count} images with captions to {out} "
          f"({len(dataset.triples)} triples, {len(exclude)} excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
