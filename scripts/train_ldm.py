#!/usr/bin/env python
"""Stage 2: train the text-conditioned latent diffusion model on a frozen stage-1 VAE.

    python scripts/train_ldm.py --config configs/train_ldm_tiny.yaml data.path=imgs/ \
        ldm.vae=runs/vae/vae.safetensors --out runs/ldm
    torchrun --nproc_per_node 2 scripts/train_ldm.py --config ... (one process per GPU / CPU share)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from ldm.train.cli import script_main
    sys.exit(script_main("ldm", __doc__.strip().splitlines()[0]))
