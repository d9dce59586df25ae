"""Score a text-to-image model on the shapes task: --seeds images per (color, shape, background).

Each of the 168 triples is generated from its canonical caption with --seeds different fixed
seeds (repeat r of triple i uses seed + i + 1000 r) and read back by plain pixel analysis
(ldm.data.shapes_classifier). Prints accuracy for colour, shape, background, all three, all
three on the 8 held-out triples, and the swap rate (shape and background colours exchanged, a
typical binding error of text-conditioned models); saves a grid PNG of the first repeat.
With --classifier, images are steered toward each triple by classifier guidance
(ldm.diffusion.classifier_guidance); with --unconditional too, the prompt is empty and only
the classifier asks for the triple. --limit N scores a fixed random subset of N triples.
`--dataset` runs the same classifier on the dataset's own images instead (must be 100%).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.data.shapes import (  # noqa: E402
    CAPTION_TEMPLATES, COLORS, HELD_OUT_TRIPLES, SHAPES, ShapesDataset, Triple, all_triples,
    caption, render,
)
from ldm.data.shapes_classifier import classify  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"model file (default: the shipped model {DEFAULT_MODEL.name})")
    p.add_argument("--dataset", action="store_true",
                   help="classify the dataset's own rendered images instead of generating")
    p.add_argument("--num", type=int, default=2000, help="--dataset: number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; repeat r of triple i uses seed + i + 1000 r (default 0)")
    p.add_argument("--seeds", type=int, default=3,
                   help="images per triple, each with its own seed (default 3: 504 images)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50, as txt2img.py)")
    p.add_argument("--sampler", default="ddim", help="sampler name (default ddim, as txt2img.py)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale (default 7.5, as txt2img.py)")
    p.add_argument("--batch", type=int, default=24, help="prompts generated together (default 24)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--outdir", default="outputs/eval_shapes",
                   help="where grid.png and results.json go (default outputs/eval_shapes)")
    p.add_argument("--device", default="cpu", help="torch device for generation (default cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): as txt2img.py, bf16 on CPUs with avx512_bf16 or "
                        "amx_bf16, fp32 on other CPUs, fp16 on CUDA")
    p.add_argument("--classifier", default=None, help="latent classifier for classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=1.0,
                   help="--classifier: guidance scale s (default 1)")
    p.add_argument("--unconditional", action="store_true",
                   help="empty prompts without classifier-free guidance (only --classifier steers)")
    p.add_argument("--limit", type=int, default=0,
                   help="score a fixed random subset of this many triples (default 0: all 168)")
    p.add_argument("--pairs", default="",
                   help="only the triples whose shape and background colours are one of these "
                        "unordered pairs, comma-separated (e.g. green-blue,green-black): a "
                        "binding probe on the pairs a model confuses (default: all)")
    p.add_argument("--template", type=int, default=0, choices=range(len(CAPTION_TEMPLATES)),
                   metavar="K", help="caption wording: template K of ldm.data.shapes."
                   "CAPTION_TEMPLATES (default 0, the canonical 'a {color} {shape} on a "
                   "{background} background'; 4 names the background first)")
    p.add_argument("--only-wrong", default=None, metavar="RESULTS",
                   help="regenerate only the images this results.json (a run with the same "
                        "--seed, --seeds, --limit and --pairs) got wrong, each with its own seed: "
                        "e.g. to see what --classifier guidance fixes")
    args = p.parse_args(argv)
    try:
        args.pairs = parse_pairs(args.pairs)
    except ValueError as err:
        p.error(str(err))
    if args.num < 1:
        p.error("--num must be >= 1")
    if args.size < 16:
        p.error("--size must be >= 16")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if not 0 <= args.limit <= len(all_triples()):
        p.error(f"--limit must be in 0..{len(all_triples())}")
    if args.classifier_scale < 0:
        p.error("--classifier-scale must be >= 0")
    return args


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'green-blue,green-black' -> [(black, green), (blue, green)]: unordered pairs as sorted
    tuples, sorted (empty text: no filter)."""
    pairs = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        colours = item.split("-")
        if len(colours) != 2 or colours[0] == colours[1] or not set(colours) <= set(COLORS):
            raise ValueError(f"--pairs: {item!r} is not two different colours a-b "
                             f"from {', '.join(COLORS)}")
        pairs.add(tuple(sorted(colours)))
    return sorted(pairs)


LIMIT_SEED = 0      # which triples --limit keeps
SEED_STRIDE = 1000  # repeat r starts at seed + 1000 r, so repeats never share a seed (168 < 1000)


def summarise(truth: list[Triple], predicted: list[Triple]) -> dict[str, float]:
    """Accuracies (percent) of colour, shape, background, all three, all three on held-out,
    and the swap rate (shape colour read as the background's and the background's as the shape's)."""
    t, p = np.asarray(truth, dtype=object), np.asarray(predicted, dtype=object)
    hits = t == p                                               # [N, 3]
    held = np.asarray([tuple(x) in HELD_OUT_TRIPLES for x in truth])
    swapped = (p[:, 0] == t[:, 2]) & (p[:, 2] == t[:, 0]) & (t[:, 0] != t[:, 2])
    out = {"color": hits[:, 0].mean(), "shape": hits[:, 1].mean(), "background": hits[:, 2].mean(),
           "all": hits.all(1).mean(), "swap": swapped.mean()}
    out = {k: 100.0 * float(v) for k, v in out.items()}
    out["held_out_all"] = 100.0 * float(hits[held].all(1).mean()) if held.any() else None  # none scored
    return out | {"count": len(truth), "held_out_count": int(held.sum())}


def print_summary(summary: dict[str, float]) -> None:
    """One table of the accuracies."""
    print(f"{'measure':<22}{'accuracy':>10}")
    for key, label in [("color", "colour"), ("shape", "shape"), ("background", "background"),
                       ("all", "all three"), ("held_out_all", "held-out all three")]:
        value = summary[key]
        print(f"{label:<22}{'n/a':>10}" if value is None else f"{label:<22}{value:>9.1f}%")
    print(f"{'colour/bg swapped':<22}{summary['swap']:>9.1f}%")
    print(f"({summary['count']} images, {summary['held_out_count']} of them held-out triples)")


def grid(images: dict[Triple, np.ndarray], predicted: dict[Triple, Triple], size: int) -> Image.Image:
    """Rows: colour x shape; columns: background. Red frame = misread, white dot = held-out."""
    pad = 4
    cell = size + pad
    canvas = Image.new("RGB", (len(COLORS) * cell + pad, len(COLORS) * len(SHAPES) * cell + pad), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for row, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        for col, background in enumerate(COLORS):
            triple = (color, shape, background)
            if triple not in images:
                continue
            x, y = pad + col * cell, pad + row * cell
            canvas.paste(Image.fromarray(images[triple]), (x, y))
            if predicted[triple] != triple:
                draw.rectangle([x - 2, y - 2, x + size + 1, y + size + 1], outline=(255, 0, 0), width=2)
            if triple in HELD_OUT_TRIPLES:
                draw.ellipse([x + 1, y + 1, x + 5, y + 5], fill=(255, 255, 255), outline=(0, 0, 0))
    return canvas


def evaluate_dataset(args: argparse.Namespace) -> tuple[dict, dict, dict, list]:
    """Classify the dataset's own images (every triple drawn, none excluded)."""
    dataset = ShapesDataset(args.num, seed=args.seed, size=args.size)
    truth, pred, images, preds = [], [], {}, {}
    for i in tqdm(range(len(dataset)), desc="classify"):
        spec, _ = dataset.spec(i)
        pixels = render(spec, args.size)
        got = classify(pixels).triple
        truth.append(spec.triple)
        pred.append(got)
        if spec.triple not in images:
            images[spec.triple], preds[spec.triple] = pixels, got
    return summarise(truth, pred), images, preds, list(zip(truth, pred))


def generate_images(pipe, prompts: list[str], first_seed: int, args: argparse.Namespace,
                    triple: Triple | None = None) -> list[np.ndarray]:
    """RGB arrays for `prompts` (prompt k with seed first_seed + k), batched exactly as txt2img;
    with args.classifier, steered toward `triple` by classifier guidance."""
    from ldm.inference import SamplingOptions, txt2img
    guide = {}
    if getattr(args, "classifier", None) and triple is not None:
        guide = {"classifier": args.classifier, "classifier_scale": args.classifier_scale,
                 "classifier_labels": "color={},shape={},bg={}".format(*triple)}
    if getattr(args, "unconditional", False):
        prompts = [""] * len(prompts)
    options = SamplingOptions(prompt=tuple(prompts), steps=args.steps, sampler=args.sampler,
                              guidance_scale=1.0 if getattr(args, "unconditional", False) else args.scale,
                              height=args.size, width=args.size, seed=first_seed, **guide)
    return [np.asarray(image.convert("RGB")) for image in txt2img(pipe, options)]


def wrong_jobs(path: str | Path, triples: list[Triple], seeds: int) -> list[tuple[int, int]]:
    """(repeat, triple index) of every image an earlier run over the same triples got wrong."""
    predictions = json.loads(Path(path).read_text())["predictions"]
    if len(predictions) != len(triples) * seeds:
        raise ValueError(f"{path} scored {len(predictions)} images, not {len(triples) * seeds}: "
                         "it was made with other --seeds, --limit or --pairs")
    jobs = []
    for n, item in enumerate(predictions):
        repeat, index = divmod(n, len(triples))
        if tuple(item["truth"]) != triples[index]:
            raise ValueError(f"{path} was made with other --limit or --pairs")
        if item["truth"] != item["predicted"]:
            jobs.append((repeat, index))
    return jobs


def evaluate_model(args: argparse.Namespace) -> tuple[dict, dict, dict, list]:
    """Generate args.seeds images per triple (repeat r of triple i with seed + i + 1000 r) and
    classify them; the grid shows the first repeat."""
    import ldm

    ckpt = Path(args.ckpt) if args.ckpt else DEFAULT_MODEL
    if not ckpt.is_file():
        raise ValueError(f"checkpoint not found: {ckpt}")
    if args.precision == "auto":  # recorded concretely in results.json
        from ldm.inference.setup import default_precision
        args.precision = default_precision(args.device)
    pipe = ldm.load_pipeline(str(ckpt), device=args.device, dtype=args.precision)
    triples = all_triples()
    if args.limit:  # a fixed random subset: every colour, shape and background turns up
        triples = sorted(random.Random(LIMIT_SEED).sample(triples, args.limit))
    if args.pairs:
        pairs = set(args.pairs)
        triples = [t for t in triples if tuple(sorted((t[0], t[2]))) in pairs]
        if not triples:
            raise ValueError("--pairs and --limit leave no triple to score")
    # Batches of consecutive triples of one repeat; one image at a time with a classifier (one
    # triple's labels per guided batch) or when only earlier misses are redone.
    if args.only_wrong:
        batches = [(repeat, index, 1) for repeat, index in wrong_jobs(args.only_wrong, triples, args.seeds)]
    else:
        batch = 1 if args.classifier else args.batch
        batches = [(repeat, start, min(batch, len(triples) - start))
                   for repeat in range(args.seeds) for start in range(0, len(triples), batch)]
    truth, pred, images, preds = [], [], {}, {}
    with tqdm(total=sum(n for _, _, n in batches), desc="generate") as bar:
        for repeat, start, count in batches:
            chunk = triples[start:start + count]
            first_seed = args.seed + start + SEED_STRIDE * repeat
            guided = chunk[0] if args.classifier else None
            prompts = [caption(t, args.template) for t in chunk]
            for triple, pixels in zip(chunk, generate_images(pipe, prompts, first_seed, args, guided)):
                got = classify(pixels).triple
                truth.append(triple)
                pred.append(got)
                if triple not in images:
                    images[triple], preds[triple] = pixels, got
            bar.update(count)
    if not truth:
        raise ValueError(f"{args.only_wrong} has no wrong image to redo")
    return summarise(truth, pred), images, preds, list(zip(truth, pred))


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation, print the table, write grid.png and results.json."""
    args = parse_args(argv)
    from ldm.errors import LdmError
    try:
        summary, images, preds, records = evaluate_dataset(args) if args.dataset else evaluate_model(args)
    except (ValueError, LdmError, RuntimeError, KeyError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print_summary(summary)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    grid(images, preds, args.size).save(outdir / "grid.png")
    details = {"summary": summary, "args": vars(args),
               "predictions": [{"truth": list(t), "predicted": list(p)} for t, p in records]}
    (outdir / "results.json").write_text(json.dumps(details, indent=1))
    print(f"grid: {outdir / 'grid.png'}; details: {outdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
