#!/usr/bin/env python
"""Stage 1: train the KL autoencoder on an image folder.

    python scripts/train_vae.py --config configs/train_vae_tiny.yaml data.path=imgs/ --out runs/vae
    torchrun --nproc_per_node 2 scripts/train_vae.py --config ... (one process per GPU / CPU share)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from ldm.train.cli import script_main
    sys.exit(script_main("vae", __doc__.strip().splitlines()[0]))
