"""Command-line front of both training scripts: arguments, config, errors as one clear line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from ldm.config import ConfigError, from_dict
from ldm.errors import LdmError
from ldm.train.config import validate
from ldm.train.state import find_checkpoint, load_state

USER_ERRORS = (ConfigError, LdmError)


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """Arguments shared by train_vae.py and train_ldm.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="training YAML (configs/train_*.yaml); optional with --resume, "
                   "which then reuses the run's own config")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config entries, e.g. run.steps=2000 optim.lr=2e-4 data.path=imgs/")
    p.add_argument("--resume", metavar="PATH",
                   help="continue a run: its output folder or one checkpoints/step-* folder")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {default_out}; "
                   "with --resume, the resumed run's folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def resolve(args: argparse.Namespace, cls: type, default_out: str):
    """(config, output folder) from --config/--resume/overrides; raises a user error if unusable."""
    from ldm.config import apply_overrides, load_yaml
    if args.resume:
        ckpt = find_checkpoint(args.resume)
        out = Path(args.out) if args.out else ckpt.parent.parent
        if args.config:
            config = load_yaml(cls, args.config, args.overrides)
        else:
            _, trainer = load_state(ckpt)
            config = from_dict(cls, apply_overrides(trainer["config"], args.overrides), "resumed config")
    else:
        if not args.config:
            raise ConfigError("give --config configs/train_*.yaml (or --resume a run)")
        config = load_yaml(cls, args.config, args.overrides)
        out = Path(args.out or default_out)
    validate(config)
    return config, out


def main(run: Callable[[argparse.Namespace], None], p: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run, and turn user errors into one line on stderr with exit code 2."""
    args = p.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 0


def set_threads(threads: int) -> None:
    """torch.set_num_threads when the config asks for a specific count."""
    if threads > 0:
        torch.set_num_threads(threads)


def script_main(stage: str, description: str, argv: list[str] | None = None) -> int:
    """The whole of scripts/train_vae.py (stage "vae") and scripts/train_ldm.py (stage "ldm")."""
    from ldm.train.config import LDMTrainConfig, VAETrainConfig
    cls, default_out = (VAETrainConfig, "runs/vae") if stage == "vae" else (LDMTrainConfig, "runs/ldm")

    def run(args: argparse.Namespace) -> None:
        from ldm.train import run as runner
        config, out = resolve(args, cls, default_out)
        train = runner.train_vae if stage == "vae" else runner.train_ldm
        print(f"wrote {train(config, out, args.resume, progress=not args.quiet)}")

    return main(run, parser(description, default_out), argv)
