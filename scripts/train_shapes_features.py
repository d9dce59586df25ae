"""Train the `shapes` feature network (ldm/assets/shapes_features.safetensors) reproducibly.

A small CNN learns to name the (colour, shape, background) triple of shapes images rendered
by ldm.data.shapes (seed 2: the default model trains on seeds 0 and 1, the evaluation's real
images use another seed). Mild noise and blur in training keep its features stable on generated
images, whose colours and edges are never exact. About 4 minutes on one idle CPU thread
(16 when the CPU is shared with other work).
    python scripts/train_shapes_features.py [--out ldm/assets/shapes_features.safetensors]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.data.shapes import ShapesDataset, all_triples, render  # noqa: E402
from ldm.eval.shapes_features import (  # noqa: E402
    DEFAULT_WEIGHTS, ShapesFeatureNet, save_shapes_features, to_input,
)

TRAIN_SEED = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights file (default: the shipped asset)")
    p.add_argument("--num", type=int, default=8000, help="training images (default 8000)")
    p.add_argument("--epochs", type=int, default=12, help="passes over the images (default 12)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a busy CPU a second thread mostly waits)")
    return p.parse_args(argv)


def render_set(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 64, 64, 3] and triple labels [N] of every triple (none held out)."""
    dataset = ShapesDataset(num, seed=seed, size=64)
    index = {t: i for i, t in enumerate(all_triples())}
    images, labels = [], []
    for i in range(num):
        spec, _ = dataset.spec(i)
        images.append(render(spec, 64))
        labels.append(index[spec.triple])
    return np.stack(images), np.asarray(labels)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image Gaussian noise (std up to 0.1) and, for half the images, a 3x3 box blur."""
    b = x.shape[0]
    std = 0.1 * torch.rand(b, 1, 1, 1, generator=generator)
    x = x + std * torch.randn(x.shape, generator=generator)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).float()
    return pick * blurred + (1 - pick) * x


@torch.inference_mode()
def standardise(net: ShapesFeatureNet, x: torch.Tensor, batch: int = 500) -> None:
    """Set the feature mean and std to those of the (clean) training images."""
    net.eval()
    net.feature_mean.zero_()
    net.feature_std.fill_(1.0)
    raw = torch.cat([net(x[i:i + batch])[0] for i in range(0, x.shape[0], batch)]).double()
    net.feature_mean.copy_(raw.mean(0))
    net.feature_std.copy_(raw.std(0).clamp_min(1e-6))


def main(argv: list[str] | None = None) -> int:
    """Render, train, report held-out accuracy, save."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    images, labels = render_set(args.num, TRAIN_SEED)
    test_images, test_labels = render_set(1000, TRAIN_SEED + 1000)
    x_all, y_all = to_input(images), torch.from_numpy(labels)
    net = ShapesFeatureNet()
    steps = args.epochs * (args.num // args.batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    net.train()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(args.num, generator=generator)
        for first in range(0, args.num - args.batch + 1, args.batch):
            idx = order[first:first + args.batch]
            _, logits = net(augment(x_all[idx], generator))
            loss = F.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s")
    standardise(net, x_all)
    with torch.inference_mode():
        _, logits = net(to_input(test_images))
    accuracy = (logits.argmax(1).numpy() == test_labels).mean()
    print(f"held-out triple accuracy: {100 * accuracy:.1f}% on 1000 images (seed {TRAIN_SEED + 1000})")
    note = (f"scripts/train_shapes_features.py --num {args.num} --epochs {args.epochs} --batch {args.batch}; "
            f"held-out accuracy {100 * accuracy:.1f}%")
    save_shapes_features(net, args.out, note)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB) in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
