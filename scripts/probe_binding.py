"""Where does a shapes model swap the shape's colour with the background's? Measures, per colour pair.

For every unordered pair of colours {a, b} (28 pairs), beside the swaps of an
`eval_shapes.py` run (`--results results.json`: how often "a S on b" came out as "b S on a"):

- text order: |E(a S on b) - E(b S on a)| / mean |E(a S on b) - E(c S on b)| over the other
  colours c, E the text tower's output for the canonical caption, averaged over the shapes.
  1 means swapping the words moves the conditioning as far as changing a colour does; near 0,
  the U-Net sees almost the same conditioning for both orders.
- latent distance: RMS distance between the scaled VAE latents of flat a and flat b images
  (close colours are harder to tell apart in latent space).
- the VAE round trip: rendered images of every triple encoded, decoded and read by the pixel
  judge; anything under 100% puts the VAE in the loop.

Prints one row per pair (sorted by text order) and the Spearman rank correlation of each
measure with the swap counts.

    python scripts/eval_shapes.py --outdir outputs/eval             # writes results.json
    python scripts/probe_binding.py --results outputs/eval/results.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.data.shapes import COLORS, PALETTE, SHAPES, ShapesDataset, all_triples, caption  # noqa: E402
from ldm.data.shapes_classifier import classify  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"
Pair = tuple[str, str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_MODEL), help="model file (default: the shipped model)")
    p.add_argument("--results", default=None,
                   help="an eval_shapes.py results.json of this model: its swaps per pair")
    p.add_argument("--images", type=int, default=1008,
                   help="rendered images for the VAE round trip (default 1008: 6 per triple)")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be >= 1")
    if not Path(args.ckpt).is_file():
        p.error(f"checkpoint not found: {args.ckpt}")
    if args.results is not None and not Path(args.results).is_file():
        p.error(f"results file not found: {args.results}")
    return args


def pairs() -> list[Pair]:
    """The 28 unordered colour pairs, each as (a, b) in palette order."""
    return list(itertools.combinations(COLORS, 2))


def swap_counts(predictions: list[dict]) -> dict[Pair, tuple[int, int]]:
    """(swapped, scored) per pair from eval_shapes' predictions [{"truth", "predicted"}]."""
    out = {pair: [0, 0] for pair in pairs()}
    for item in predictions:
        (color, shape, background), got = item["truth"], item["predicted"]
        key = tuple(sorted((color, background), key=COLORS.index))
        out[key][1] += 1
        out[key][0] += list(got) == [background, shape, color]
    return {k: (v[0], v[1]) for k, v in out.items()}


def text_order(pipe) -> dict[Pair, float]:
    """Distance between the two word orders, relative to changing one colour (see the top)."""
    triples = all_triples()
    index = {t: i for i, t in enumerate(triples)}
    emb = pipe.encode_prompt([caption(t) for t in triples]).float().flatten(1)

    def dist(x: tuple, y: tuple) -> float:
        return float((emb[index[x]] - emb[index[y]]).norm())
    out = {}
    for a, b in pairs():
        ratios = []
        for s in SHAPES:
            swapped = dist((a, s, b), (b, s, a))
            one_colour = np.mean([dist((a, s, b), (c, s, b)) for c in COLORS if c not in (a, b)])
            ratios.append(swapped / one_colour)
        out[(a, b)] = float(np.mean(ratios))
    return out


def flat_latents(pipe, size: int) -> torch.Tensor:
    """Scaled latents [8, C, h, w] of a flat image of each palette colour."""
    flat = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 127.5 - 1.0
    images = flat[:, :, None, None].expand(-1, -1, size, size).contiguous()
    mean, _ = pipe.encode_image(images)
    return mean.float() * pipe.config.diffusion.scale_factor


def latent_distance(pipe, size: int) -> dict[Pair, float]:
    """RMS distance between flat-colour latents."""
    z = flat_latents(pipe, size)
    return {(a, b): float((z[COLORS.index(a)] - z[COLORS.index(b)]).pow(2).mean().sqrt())
            for a, b in pairs()}


def vae_round_trip(pipe, count: int, size: int, batch: int = 168) -> tuple[int, int]:
    """(read back as rendered, images) over `count` rendered images, canonical captions only."""
    dataset = ShapesDataset(count, seed=123, size=size, paraphrase=False)
    same = 0
    for start in range(0, count, batch):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(count, start + batch))])
        mean, _ = pipe.encode_image(images)
        decoded = pipe.decode_latents(mean * pipe.config.diffusion.scale_factor).float()
        for original, back in zip(images, decoded):
            same += classify(to_uint8(original)).triple == classify(to_uint8(back)).triple
    return same, count


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties share their mean rank); nan when either side is constant."""
    from scipy.stats import spearmanr
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and the correlations."""
    args = parse_args(argv)
    import ldm
    from ldm.errors import LdmError
    try:
        pipe = ldm.load_pipeline(args.ckpt, device="cpu", dtype="fp32", prepare=False)
        swaps = swap_counts(json.loads(Path(args.results).read_text())["predictions"]) \
            if args.results else None
        size = pipe.config.autoencoder.resolution
        with torch.inference_mode():
            order, latent = text_order(pipe), latent_distance(pipe, size)
            same, count = vae_round_trip(pipe, args.images, size)
    except (ValueError, KeyError, OSError, LdmError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    rows = sorted(pairs(), key=order.get)
    print(f"{'pair':<16}{'text order':>11}{'latent dist':>12}" + (f"{'swaps':>10}" if swaps else ""))
    for pair in rows:
        line = f"{pair[0] + '-' + pair[1]:<16}{order[pair]:>11.3f}{latent[pair]:>12.3f}"
        print(line + (f"{swaps[pair][0]:>6}/{swaps[pair][1]:<3}" if swaps else ""))
    print(f"VAE round trip: {same} of {count} rendered images read back as rendered")
    table = {"pairs": [{"pair": list(p), "text_order": order[p], "latent_distance": latent[p],
                        **({"swaps": swaps[p][0], "scored": swaps[p][1]} if swaps else {})}
                       for p in rows],
             "vae_round_trip": {"same": same, "images": count}}
    if swaps:
        counts = [swaps[p][0] for p in rows]
        table["spearman_swaps"] = {"text_order": spearman([order[p] for p in rows], counts),
                                   "latent_distance": spearman([latent[p] for p in rows], counts)}
        print("Spearman rank correlation with swaps: text order {text_order:+.2f}, "
              "latent distance {latent_distance:+.2f}".format(**table["spearman_swaps"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
