"""Turn a trained stage-2 checkpoint into the shipped default model file (fp16 weights).

The network weights are stored as float16 to fit the 25 MB budget (the width-64 text tower's
49408-row token embedding alone is 3.2M weights); loading casts them back to float32. The
schedule buffers keep their dtype (the loader compares them with the config's schedule).
The config (and a note on where the file came from) stays in the safetensors metadata.

With --base (a distilled student beside its teacher), only the U-Net and the schedule buffers
are written: the VAE and text encoder must equal the base file's, which the new file names
and pins by SHA-256, so loading completes it from there (ldm.checkpoint).

    python scripts/export_default_model.py runs/ldm/model.safetensors
    python scripts/export_default_model.py runs/distill/student-4steps.safetensors \
        --out ldm/assets/shapes_4step.safetensors --base ldm/assets/shapes.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"
MAX_BYTES = 25 * 1000 * 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="stage-2 model file (train_ldm.py's model.safetensors, EMA weights)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"where to write (default {DEFAULT_OUT})")
    p.add_argument("--note", default="", help="free text stored in the metadata key ldm_note")
    p.add_argument("--base", default=None,
                   help="a file in the --out folder holding the same VAE and text encoder: store "
                        "only the U-Net and name this file (checked by SHA-256) for the rest")
    p.add_argument("--max-mb", type=float, default=MAX_BYTES / 1e6,
                   help="refuse to write a file larger than this many MB (default 25)")
    return p.parse_args(argv)


def without_shared(half: dict, out: Path, base: Path) -> tuple[dict, dict[str, str]]:
    """(the tensors less the VAE and text encoder, the metadata naming `base`), after checking
    that `base` sits beside `out` and holds exactly those networks."""
    from ldm import checkpoint as ckpt
    if base.resolve().parent != out.resolve().parent:
        raise ValueError(f"--base {base} must be in the folder of --out {out} (it is found there)")
    base_tensors, _ = ckpt.read_checkpoint(base)
    shared = tuple(ckpt.PREFIXES[p] for p in ckpt.SHARED_PARTS)
    keys = [k for k in half if k.startswith(shared)]
    differ = [k for k in keys if k not in base_tensors or not base_tensors[k].equal(half[k])]
    differ += [k for k in base_tensors if k.startswith(shared) and k not in half]
    if differ:
        raise ValueError(f"the VAE / text encoder differ from {base}'s ({len(differ)} tensors, "
                         f"e.g. {differ[0]})")
    slim = {k: v for k, v in half.items() if not k.startswith(shared)}
    return slim, {ckpt.BASE_METADATA_KEY: base.name, ckpt.BASE_SHA_METADATA_KEY: ckpt.file_sha256(base)}


def export(checkpoint: Path, out: Path, note: str, max_bytes: int, base: Path | None = None) -> int:
    """Write the fp16 copy, check it loads as a pipeline; returns its size in bytes."""
    import torch

    import ldm
    from ldm import checkpoint as ckpt

    tensors, metadata = ckpt.read_checkpoint(checkpoint)
    if ckpt.CONFIG_METADATA_KEY not in metadata:
        raise ValueError(f"{checkpoint} carries no config (metadata key {ckpt.CONFIG_METADATA_KEY!r})")
    network_prefixes = tuple(ckpt.PREFIXES.values())
    half = {k: (v.half() if k.startswith(network_prefixes) and v.is_floating_point() else v)
            for k, v in tensors.items() if not k.startswith(ckpt.EMA_PREFIX)}
    base_metadata: dict[str, str] = {}
    if base is not None:
        half, base_metadata = without_shared(half, out, base)
    size = sum(v.numel() * v.element_size() for v in half.values())
    if size > max_bytes:
        raise ValueError(f"the exported weights would take {size / 1e6:.1f} MB (> {max_bytes / 1e6:.1f} MB)")
    extra = {"ldm_note": note} if note else {}
    ckpt.write_checkpoint(out, half, {**metadata, **extra, **base_metadata})
    ldm.load_pipeline(out, dtype=torch.float32)  # the shipped file must load strictly
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    """Export, or one line on stderr and exit code 2."""
    args = parse_args(argv)
    from ldm.errors import LdmError
    try:
        size = export(Path(args.checkpoint), Path(args.out), args.note, int(args.max_mb * 1e6),
                      Path(args.base) if args.base else None)
    except (LdmError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
