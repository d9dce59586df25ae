"""Score generated images as the field does: FID, KID, IS, precision/recall, CLIP score.

  evaluate.py --real DIR --fake DIR [--out results.json]        score two image folders
  evaluate.py --real DIR --ckpt CKPT --prompts FILE [--n N]      generate (seed + i per image), then score
  evaluate.py --table ddim [--n N] [--out outputs/ddim_table.json]  DDIM steps x eta table on the default model

Features: --features inception (the standard pt_inception-2015-12-05 network, weights from
--inception-weights or $LDM_INCEPTION_WEIGHTS; nothing is downloaded) or --features shapes (a
small CNN trained on the shapes data set, shipped; its numbers are named shapes-FID etc.).
Default: inception when its weights are given, else shapes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402

from ldm.errors import LdmError  # noqa: E402
from ldm.eval.errors import EvalError  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"
PROG = "evaluate.py"
# Images per cell of --table ddim: its 16 cells cost 720 sampling steps per image. Unguided on
# one thread of a shared two-core CPU that was 38 ms per image-step (36 images: 16.4 minutes)
# and 69 ms under heavier load (18 images: 14.8 minutes); --n 18 is the heavy-load choice.
TABLE_N = 36


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: 'evaluate.py: error: ...', exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


def fail(message: str) -> None:
    """Print the one-line error and exit 2."""
    print(f"{PROG}: error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, checked for consistency."""
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", help="folder of real images")
    p.add_argument("--fake", help="folder of generated images (captions as NNN.txt for --clip-score)")
    p.add_argument("--ckpt", help="generate the fake set with this model ('default': the shipped one)")
    p.add_argument("--prompts", help="--ckpt: prompts file, one per line (cycled to --n images)")
    p.add_argument("--n", type=int, default=None,
                   help="--ckpt: images to generate (default: one per prompt); --table: images per cell "
                        f"(default {TABLE_N})")
    p.add_argument("--table", choices=["ddim"], help="ddim: the DDIM paper's steps x eta table on --ckpt")
    p.add_argument("--num-real", type=int, default=2000, help="--table: held-out real images (default 2000)")
    p.add_argument("--features", choices=["inception", "shapes"], default=None,
                   help="feature network (default: inception when its weights are given, else shapes)")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05 weights (.pth)")
    p.add_argument("--shapes-weights", default=None, help="shapes feature weights (default: the shipped asset)")
    p.add_argument("--clip-score", action="store_true", help="also the CLIP score of the fake set")
    p.add_argument("--clip-model", default=None, help="OpenCLIP architecture name or model config .json")
    p.add_argument("--clip-weights", default=None, help="OpenCLIP checkpoint file for --clip-model")
    p.add_argument("--steps", type=int, default=50, help="--ckpt: sampling steps (default 50)")
    p.add_argument("--sampler", default="ddim", help="--ckpt: sampler (default ddim)")
    p.add_argument("--eta", type=float, default=None, help="--ckpt: eta (default: the sampler's)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="guidance scale (default 7.5; --table: 1, unguided as the DDIM paper's models)")
    p.add_argument("--seed", type=int, default=0, help="--ckpt: image i uses seed + i (default 0)")
    p.add_argument("--batch", type=int, default=32, help="images generated together (default 32)")
    p.add_argument("--save-fake", default=None,
                   help="--ckpt: also save the generated images here (--table: one folder per cell)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON results file (--table: also .md and .png beside it)")
    args = p.parse_args(argv)
    if args.table:
        if args.real or args.fake or args.prompts:
            p.error("--table generates its own real and fake sets; drop --real, --fake and --prompts")
        args.n = TABLE_N if args.n is None else args.n
    elif args.ckpt:
        if not args.real or not args.prompts:
            p.error("--ckpt needs --real DIR (what to compare with) and --prompts FILE")
        if args.fake:
            p.error("--ckpt generates the fake set; drop --fake")
    elif not (args.real and args.fake):
        p.error("give --real DIR and --fake DIR, or --real DIR --ckpt CKPT --prompts FILE, or --table ddim")
    for name in ("n", "num_real", "batch", "kid_subsets", "kid_subset_size", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.clip_score and not (args.clip_model and args.clip_weights):
        p.error("--clip-score needs --clip-model ARCH and --clip-weights PATH (a local OpenCLIP checkpoint)")
    return args


def make_extractor(args: argparse.Namespace):
    """The feature network the flags ask for (weights checked before any work)."""
    from ldm.eval.inception import InceptionExtractor, inception_weights_path, missing_weights_message
    from ldm.eval.shapes_features import ShapesExtractor

    weights = inception_weights_path(args.inception_weights)
    features = args.features or ("inception" if weights else "shapes")
    if features == "inception":
        if weights is None:
            raise EvalError(missing_weights_message())
        return InceptionExtractor(weights)
    if args.features is None and not args.table:
        print("note: no Inception weights given (--inception-weights or $LDM_INCEPTION_WEIGHTS): "
              "using the shapes feature network; its scores are shapes-FID etc., not comparable with FID")
    return ShapesExtractor(args.shapes_weights)


def note_sizes(extractor, *sets: list[np.ndarray]) -> None:
    """Print one note when the images do not all have one size (they are resized, not refused)."""
    sizes = sorted({im.shape[:2] for images in sets for im in images})
    if len(sizes) > 1:
        target = (f"{extractor.native_size}x{extractor.native_size} for the shapes network (bilinear, antialiased)"
                  if extractor.native_size else "299x299 inside the Inception network (its TF1-compatible bilinear)")
        shown = ", ".join(f"{w}x{h}" for h, w in sizes[:4]) + (" ..." if len(sizes) > 4 else "")
        print(f"note: images of {len(sizes)} sizes ({shown}): each is resized to {target}")


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--ckpt, or the shipped model for 'default' or no flag."""
    return DEFAULT_MODEL if args.ckpt in (None, "default") else Path(args.ckpt)


def load_pipe(args: argparse.Namespace):
    """The model to generate with."""
    import ldm

    ckpt = checkpoint_path(args)
    if not ckpt.is_file():
        raise EvalError(f"checkpoint not found: {ckpt}")
    return ldm.load_pipeline(str(ckpt))


def sampling_options(args: argparse.Namespace):
    """The front door's options for generation (validated there)."""
    import ldm

    scale = args.guidance_scale if args.guidance_scale is not None else (1.0 if args.table else 7.5)
    return ldm.SamplingOptions(steps=args.steps, sampler=args.sampler, eta=args.eta, guidance_scale=scale)


def fake_set(args: argparse.Namespace) -> tuple[list[np.ndarray], list[str] | None]:
    """The fake images (read or generated) and their prompts when known."""
    from ldm.eval.generate import cycle_prompts, generate, read_prompts, save_images
    from ldm.eval.images import list_images, read_captions, read_images

    if args.fake:
        files = list_images(args.fake, "--fake")
        return read_images(files), read_captions(files)
    prompts = read_prompts(args.prompts)
    prompts = cycle_prompts(prompts, args.n or len(prompts))
    options, pipe = sampling_options(args), load_pipe(args)
    start = time.perf_counter()
    images = generate(pipe, options, prompts, seed=args.seed, batch=args.batch)
    print(f"generated {len(images)} images in {time.perf_counter() - start:.1f}s")
    if args.save_fake:
        save_images(images, prompts, args.save_fake)
    return images, prompts


def write_json(path: str | Path, data: dict) -> None:
    """Write then rename, so a failure leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def score_folders(args: argparse.Namespace) -> dict:
    """FID, KID, IS, precision/recall (and CLIP score) of the fake set against the real one."""
    from ldm.eval.clip_score import ClipScorer
    from ldm.eval.images import list_images, read_images
    from ldm.eval.metrics import check_counts, distribution_metrics, extract

    extractor = make_extractor(args)
    scorer = ClipScorer(args.clip_model, args.clip_weights) if args.clip_score else None
    real = read_images(list_images(args.real, "--real"))
    if args.fake:  # a folder's problems are reported before any generation starts
        list_images(args.fake, "--fake")
    fake, prompts = fake_set(args)
    check_counts(extractor, len(real), len(fake))
    if scorer is not None and prompts is None:
        raise EvalError("--clip-score needs a caption per fake image (NNN.txt beside NNN.png)")
    note_sizes(extractor, real, fake)
    real_feats, _ = extract(extractor, real)
    fake_feats, fake_probs = extract(extractor, fake)
    m = distribution_metrics(real_feats, fake_feats, fake_probs, args.kid_subsets, args.kid_subset_size)
    p = extractor.metric_prefix
    metrics = {f"{p}FID": m["fid"], f"{p}KID": m["kid"], f"{p}KID_stderr": m["kid_stderr"],
               f"{p}IS": m["is"], f"{p}precision": m["precision"], f"{p}recall": m["recall"]}
    if scorer is not None:
        metrics["CLIP score"] = scorer.score(fake, prompts)
    return {"features": extractor.name, "metrics": metrics, "num_real": m["num_real"],
            "num_fake": m["num_fake"], "args": vars(args)}


def print_table(result: dict) -> None:
    """One metric per line."""
    m = result["metrics"]
    print(f"{'metric':<20}{'value':>24}")
    for key, value in m.items():
        if key.endswith("KID_stderr"):
            continue
        text = f"{value:.5f} ± {m[key + '_stderr']:.5f}" if key.endswith("KID") else f"{value:.4f}"
        print(f"{key:<20}{text:>24}")
    print(f"({result['num_real']} real, {result['num_fake']} fake images; {result['features']} features)")


def run_table(args: argparse.Namespace) -> None:
    """The DDIM table: print it, write JSON, markdown and plot."""
    from ldm.eval.ddim_table import markdown, run_table as table, write_outputs

    args.features = args.features or "shapes"
    extractor = make_extractor(args)  # checked now; loaded again after generation, which may be long
    if args.n < extractor.dim + 1:
        raise EvalError(f"{extractor.metric_prefix}FID with {extractor.dim}-dimensional features needs "
                        f"--n >= {extractor.dim + 1} images per cell, got {args.n}")
    options, pipe = sampling_options(args), load_pipe(args)
    start = time.perf_counter()
    ckpt = checkpoint_path(args)
    model_id = f"{ckpt.resolve()} ({ckpt.stat().st_size} bytes)"
    result = table(pipe, options, lambda: make_extractor(args), args.n, args.num_real, batch=args.batch,
                   save_dir=args.save_fake, model_id=model_id)
    result["seconds"] = time.perf_counter() - start
    print(markdown(result))
    paths = write_outputs(result, args.out or "outputs/ddim_table.json")
    print(f"{result['seconds']:.0f}s; wrote {', '.join(str(p) for p in paths)}")


def main(argv: list[str] | None = None) -> int:
    """Parse, run, report; every user error is one line and exit 2."""
    args = parse_args(argv)
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.table:
            run_table(args)
            return 0
        result = score_folders(args)
    except (EvalError, LdmError, ValueError, OSError) as err:
        fail(str(err) or type(err).__name__)
    print_table(result)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
