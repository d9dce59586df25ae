"""Resumable training state on disk: one directory per checkpoint, renamed into place atomically.

    out/checkpoints/step-000500/weights.safetensors   raw weights of every trained module (+ EMA)
    out/checkpoints/step-000500/trainer.pt            optimizers, schedulers, step, data position, RNG
    out/checkpoints/latest                            name of the newest complete directory (informative)

A directory is written under a temporary name and renamed only when complete, so a run
killed at any moment leaves the previous checkpoints intact. `trainer.pt` holds only
tensors and plain containers and is read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldm.errors import LdmError

WEIGHTS = "weights.safetensors"
TRAINER = "trainer.pt"


class ResumeError(LdmError, ValueError):
    """A resume path that does not hold a usable checkpoint."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(root: Path, step: int, weights: dict[str, torch.Tensor], trainer: dict[str, Any],
               keep: int, metadata: dict[str, str] | None = None) -> Path:
    """Write checkpoint `step` under root/checkpoints atomically; prune to the newest `keep`."""
    ckpt_root = root / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # safetensors refuses shared or non-contiguous storage: give it plain copies
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS),
              metadata=metadata)
    torch.save(trainer, tmp / TRAINER)
    for name in (WEIGHTS, TRAINER):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_atomic_text(ckpt_root / "latest", final.name)
    complete = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its checkpoints/ folder, or the directory itself."""
    path = Path(path)
    if not path.exists():
        raise ResumeError(f"resume path does not exist: {path}")
    if (path / TRAINER).is_file() and (path / WEIGHTS).is_file():
        return path
    ckpt_root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    # the newest complete directory wins (`latest` may lag if a kill fell between rename and pointer)
    complete = sorted(p for p in ckpt_root.glob("step-*")
                      if (p / TRAINER).is_file() and (p / WEIGHTS).is_file())
    if not complete:
        raise ResumeError(f"no training checkpoint found under {path} (expected checkpoints/step-*/)")
    return complete[-1]


def load_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, trainer state) of one checkpoint directory; loading never executes code."""
    try:
        weights = load_file(str(directory / WEIGHTS))
        trainer = torch.load(directory / TRAINER, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files: one clear line from the caller
        raise ResumeError(f"cannot read checkpoint {directory}: {err}") from None
    return weights, trainer


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under `prefix.` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
