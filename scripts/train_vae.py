#!/usr/bin/env python
"""Stage 1: train the KL autoencoder on an image folder.

    python scripts/train_vae.py --config configs/train_vae_tiny.yaml data.path=imgs/ --out runs/vae
    torchrun --nproc_per_node 2 scripts/train_vae.py --config ... (one process per GPU / CPU share)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.train.cli import main, parser, resolve  # noqa: E402
from ldm.train.config import VAETrainConfig  # noqa: E402

DEFAULT_OUT = "runs/vae"


def run(args) -> None:
    """Resolve the config and train."""
    from ldm.train.run import train_vae
    config, out = resolve(args, VAETrainConfig, DEFAULT_OUT)
    path = train_vae(config, out, args.resume, progress=not args.quiet)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main(run, parser(__doc__.strip().splitlines()[0], DEFAULT_OUT), None))
