"""Train a noise-aware latent classifier for classifier guidance on the shapes data.

Rendered shapes images are encoded once with a model's VAE (scaled latents, as the U-Net sees
them); every step draws a posterior sample, a timestep t uniform in 0..T-1 and noise, forms
x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps with the model's own schedule (DDPM eq. 4), and
minimises the summed cross-entropy of the colour, shape and background heads (Dhariwal &
Nichol 2021 train their guidance classifiers on noised inputs in the same way). Prints the
validation accuracy per t band and writes one safetensors file (weights + config + labels).

    python scripts/train_classifier.py --out ldm/assets/shapes_classifier.safetensors
(the defaults are the shipped classifier's recipe: about 15 minutes on two busy cores; colour and
background are read well at low t, shape needs a longer run, e.g. --steps 1500)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.data.shapes import COLORS, SHAPES, ShapesDataset  # noqa: E402
from ldm.models.classifier import ClassifierConfig, LatentClassifier, save_classifier  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"
LABELS = {"color": COLORS, "shape": SHAPES, "bg": COLORS}
T_BANDS = ((0, 100), (100, 300), (300, 500), (500, 700), (700, 900), (900, 1000))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_MODEL), help="model whose VAE and schedule to use")
    p.add_argument("--out", default="outputs/shapes_classifier.safetensors", help="output file")
    p.add_argument("--images", type=int, default=1500, help="training images (default 1500)")
    p.add_argument("--val-images", type=int, default=300, help="validation images (default 300)")
    p.add_argument("--steps", type=int, default=350, help="optimizer steps (default 350)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--channels", type=int, default=32, help="model channels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init and noise (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    for name in ("images", "val_images", "steps", "batch", "channels"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    return args


def encode_dataset(pipe, count: int, seed: int, batch: int = 200) -> tuple[torch.Tensor, ...]:
    """(posterior mean, posterior std, labels [N, 3]) of `count` rendered images, scaled latents."""
    dataset = ShapesDataset(count, seed=seed, size=pipe.config.autoencoder.resolution)
    scale = pipe.config.diffusion.scale_factor
    means, stds, labels = [], [], []
    with torch.inference_mode():
        for start in range(0, count, batch):
            items = [dataset[i] for i in range(start, min(count, start + batch))]
            mean, logvar = pipe.encode_image(torch.stack([it["image"] for it in items]))
            means.append(mean.float() * scale)
            stds.append(torch.exp(0.5 * logvar.float()) * scale)
            labels += [[COLORS.index(c), SHAPES.index(s), COLORS.index(b)] for c, s, b in
                       (it["triple"] for it in items)]
    return torch.cat(means), torch.cat(stds), torch.tensor(labels)


def noised(z: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    a = abar[t].sqrt().float()[:, None, None, None]
    s = (1 - abar[t]).sqrt().float()[:, None, None, None]
    return a * z + s * torch.randn(z.shape, generator=generator)


def loss_and_hits(model: LatentClassifier, x: torch.Tensor, t: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the heads, [B, heads] correct predictions)."""
    logits = model(x, t)
    loss = sum(F.cross_entropy(logits[name], labels[:, k]) for k, name in enumerate(LABELS))
    hits = torch.stack([logits[name].argmax(1) == labels[:, k] for k, name in enumerate(LABELS)], 1)
    return loss, hits


@torch.no_grad()
def validate(model: LatentClassifier, val: tuple[torch.Tensor, ...], abar: torch.Tensor,
             seed: int) -> dict[tuple[int, int], list[float]]:
    """Accuracy (percent) of each head and of all three, per t band, on the validation latents."""
    mean, _, labels = val
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for low, high in T_BANDS:
        t = torch.randint(low, high, (mean.shape[0],), generator=generator)
        _, hits = loss_and_hits(model, noised(mean, t, abar, generator), t, labels)
        out[(low, high)] = [100 * v for v in hits.float().mean(0).tolist()] + \
            [100 * hits.all(1).float().mean().item()]
    return out


def print_table(table: dict[tuple[int, int], list[float]]) -> None:
    """Validation accuracy per t band."""
    print(f"{'t':<12}" + "".join(f"{name:>8}" for name in (*LABELS, "all")))
    for (low, high), row in table.items():
        print(f"{f'{low}-{high - 1}':<12}" + "".join(f"{v:>7.1f}%" for v in row))


def train(args: argparse.Namespace) -> LatentClassifier:
    """Encode the data, train, print the validation table; returns the trained classifier."""
    import ldm
    pipe = ldm.load_pipeline(args.ckpt, device="cpu", dtype="fp32")
    abar = pipe.schedule.alphas_cumprod
    t0 = time.perf_counter()
    mean, std, labels = encode_dataset(pipe, args.images, args.seed)
    val = encode_dataset(pipe, args.val_images, args.seed + 1)
    print(f"encoded {args.images} + {args.val_images} images in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(args.seed)
    config = ClassifierConfig(labels=LABELS, in_channels=mean.shape[1], model_channels=args.channels)
    model = LatentClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, mean.shape[0], (args.batch,), generator=generator)
        z = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        t = torch.randint(0, abar.shape[0], (args.batch,), generator=generator)
        loss, hits = loss_and_hits(model, noised(z, t, abar, generator), t, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f}, batch accuracy (all three) "
                  f"{100 * hits.all(1).float().mean().item():.1f}%, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    model.eval()
    print_table(validate(model, val, abar, args.seed + 2))
    return model


def main(argv: list[str] | None = None) -> int:
    """Train and save; bad input is one line and exit status 2."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.errors import LdmError
    if not Path(args.ckpt).is_file():
        print(f"error: checkpoint not found: {args.ckpt}", file=sys.stderr)
        return 2
    try:
        model = train(args)
    except (LdmError, ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out)
    print(f"classifier: {out} ({out.stat().st_size / 1e6:.2f} MB, "
          f"{sum(p.numel() for p in model.parameters())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
