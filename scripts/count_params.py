"""Print parameter counts of the full-size models in configs/ (built on the meta device)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ldm.errors import LdmError  # noqa: E402
from ldm.models.layers import count_parameters  # noqa: E402
from ldm.pipeline import build_networks, resolve_config  # noqa: E402

DEFAULT = ["configs/sd1.yaml", "configs/sd2.yaml", "configs/sd2-v.yaml"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("configs", nargs="*", help="our YAML, an SD inference YAML or a preset "
                        f"name (default: {' '.join(DEFAULT)})")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    names = args.configs or [str(root / c) for c in DEFAULT]
    print(f"{'config':<24}{'U-Net':>10}{'VAE':>10}{'text':>10}")
    for name in names:
        try:
            config = resolve_config(name)
            with torch.device("meta"):  # shapes only: no memory, no init time
                autoencoder, unet, text_encoder = build_networks(config)
        except LdmError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        counts = [count_parameters(m) / 1e6 for m in (unet, autoencoder, text_encoder)]
        print(f"{Path(name).name:<24}{counts[0]:>9.1f}M{counts[1]:>9.2f}M{counts[2]:>9.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
