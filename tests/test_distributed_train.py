"""Stage 2 under torchrun: two Gloo ranks train the U-Net through DistributedDataParallel
(gradient accumulation, gradient checkpointing, EMA), checkpoint plain keys, resume, and land
where one process lands."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.train.cli import script_main
from train_helpers import TINY_LDM, TINY_VAE, make_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "scripts" / "train_ldm.py"), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:07d}" / "weights.safetensors"))


def _ldm_args(tmp_path: Path) -> list[str]:
    """A tiny stage 2 on a one-step VAE."""
    folder = make_folder(tmp_path / "imgs", count=8)
    vae = tmp_path / "vae"
    assert script_main("vae", "", ["--config", str(ROOT / "configs/train_vae_tiny.yaml"), *TINY_VAE,
                                   f"data.path={folder}", "run.steps=1", "--out", str(vae), "--quiet"]) == 0
    return ["--config", str(ROOT / "configs/train_ldm_tiny.yaml"), *TINY_LDM, f"data.path={folder}",
            f"ldm.vae={vae / 'vae.safetensors'}", "optim.warmup_steps=0", "optim.lr=0.01",
            # Adam with a large eps steps in proportion to the gradient (near SGD), so a gradient
            # that is not the global average shows; with the usual eps, Adam's sign-like first
            # steps would hide it
            "optim.eps=1.0", "optim.weight_decay=0", "--quiet"]


def _update(weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> torch.Tensor:
    """How the trained network's weights moved from `start`."""
    return torch.cat([(weights[k] - start[k]).flatten() for k in weights if k.startswith("net.")])


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert float(reference.abs().max()) > 1e-4  # they did train
    return float((ours - reference).norm() / reference.norm())


def test_two_ranks_with_ddp_resume_and_match_one_process(tmp_path):
    # the tiny config trains its text tower too; accumulation exercises DDP's no_sync
    args = [*_ldm_args(tmp_path), "run.grad_accum=2", "run.gradient_checkpointing=true",
            "run.checkpoint_every=2", "ema.decay=0.9"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _torchrun([*args, "run.steps=2", "--out", str(ddp)])
    _torchrun(["--resume", str(ddp), "run.steps=4", "--quiet"])
    assert script_main("ldm", "", [*args, "run.steps=4", "--out", str(single)]) == 0

    a, one = _weights(ddp, 4), _weights(single, 4)
    assert a.keys() == one.keys()
    assert not [k for k in a if ".module." in k or k.startswith("module.")]
    assert any(k.startswith("ema.") for k in a)
    # The resumed steps 3 and 4 on two ranks move the weights as one process does: the same
    # global batches and noise, only the order of float sums differs.
    assert _relative_error(_update(a, _weights(ddp, 2)), _update(one, _weights(single, 2))) < 1e-3
    assert (ddp / "model.safetensors").is_file()
    steps = (ddp / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 4  # only rank 0 logged, without gaps across the resume


def test_frozen_text_tower_two_ranks_match_one_process(tmp_path):
    # DDP over the U-Net alone (a frozen tower has no trainable weights to look after)
    args = [*_ldm_args(tmp_path), "model.text_encoder.trainable=false", "run.steps=2",
            "run.checkpoint_every=1"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _torchrun([*args, "--out", str(ddp)])
    assert script_main("ldm", "", [*args, "--out", str(single)]) == 0
    ours = _update(_weights(ddp, 2), _weights(ddp, 1))
    assert _relative_error(ours, _update(_weights(single, 2), _weights(single, 1))) < 1e-3
