"""A run SIGKILLed mid-way and resumed ends with exactly the weights of an uninterrupted run;
two Gloo ranks under torchrun keep identical weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.train.cli import script_main
from train_helpers import TINY_LDM, TINY_VAE, make_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 16


def _vae_args(folder: Path, out: Path) -> list[str]:
    # a discriminator from step 1 and EMA make the state to restore as rich as it gets
    return ["--config", str(ROOT / "configs/train_vae_tiny.yaml"), *TINY_VAE, f"data.path={folder}",
            "data.size=24", "autoencoder.resolution=24", "loss.disc_start=1", "loss.disc_layers=2",
            "ema.enabled=true", "ema.decay=0.9", "data.flip=true", "data.crop=random",
            f"run.steps={STEPS}", "run.checkpoint_every=2", "run.grad_accum=2", "--out", str(out), "--quiet"]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{STEPS:07d}" / "weights.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=6, size=(30, 26))
    reference = tmp_path / "reference"
    assert script_main("vae", "", _vae_args(folder, reference)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "scripts/train_vae.py", *_vae_args(folder, killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # kill right after the first checkpoint: the run still has 14 steps to go (slack for a busy CPU)
    while not (killed / "checkpoints" / "step-0000002").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").glob("step-*"))
    assert f"step-{STEPS:07d}" not in done, "killed too late to test anything"

    assert script_main("vae", "", ["--resume", str(killed), "--quiet"]) == 0
    ref, res = _final_weights(reference), _final_weights(killed)
    assert ref.keys() == res.keys()
    different = [k for k in ref if not torch.equal(ref[k], res[k])]
    assert not different, different[:5]
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the curve has no gaps or repeats


def test_ldm_stopped_and_resumed_matches_uninterrupted(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=6)
    vae = tmp_path / "vae"
    assert script_main("vae", "", ["--config", str(ROOT / "configs/train_vae_tiny.yaml"), *TINY_VAE,
                                   f"data.path={folder}", "run.steps=1", "--out", str(vae), "--quiet"]) == 0
    args = ["--config", str(ROOT / "configs/train_ldm_tiny.yaml"), *TINY_LDM, f"data.path={folder}",
            f"ldm.vae={vae / 'vae.safetensors'}", "run.checkpoint_every=2", "ldm.caption_dropout=0.5",
            "ldm.noise_offset=0.1", "--quiet"]
    assert script_main("ldm", "", [*args, "run.steps=4", "--out", str(tmp_path / "a")]) == 0
    assert script_main("ldm", "", [*args, "run.steps=2", "--out", str(tmp_path / "b")]) == 0
    # the resumed run must keep the scale factor measured on the first run's first batch
    assert script_main("ldm", "", ["--resume", str(tmp_path / "b"), "run.steps=4", "--quiet"]) == 0
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000004" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000004" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from ldm.checkpoint import read_checkpoint
    meta_a = read_checkpoint(tmp_path / "a" / "model.safetensors")[1]
    meta_b = read_checkpoint(tmp_path / "b" / "model.safetensors")[1]
    assert meta_a == meta_b


_RANK_PROGRAM = r'''
import sys
from pathlib import Path
import torch
from ldm.config import load_yaml, to_dict
from ldm.train.config import VAETrainConfig
from ldm.train.data import make_batches
from ldm.train.distributed import init_distributed, shutdown
from ldm.train.loop import Trainer
from ldm.train.vae import VAETask

config_path, out, *overrides = sys.argv[1:]
config = load_yaml(VAETrainConfig, config_path, overrides)
info = init_distributed("cpu")
batches_from, preview = make_batches(config.data, config.run.batch_size, config.run.seed, info)
task = VAETask(config, info.device, preview)
Trainer(task, config.run, config.ema, info, Path(out), to_dict(config), batches_from).fit()
state = {f"{k}": v for k, v in task.autoencoder.state_dict().items()}
torch.save(state, Path(out) / f"rank{info.rank}.pt")
shutdown(info)
'''


def test_two_gloo_ranks_keep_identical_weights_equal_to_one_process(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=8)
    program = tmp_path / "rank_program.py"
    program.write_text(_RANK_PROGRAM)
    overrides = [o for o in TINY_VAE if not o.startswith("run.threads")] + [
        f"data.path={folder}", "run.steps=3", "run.checkpoint_every=3", "optim.lr=0.01",
        "optim.warmup_steps=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    config = str(ROOT / "configs/train_vae_tiny.yaml")
    out, single = tmp_path / "ddp", tmp_path / "single"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", str(program), config, str(out), *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, str(program), config, str(single), *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    one = torch.load(single / "rank0.pt", weights_only=True)
    assert a.keys() == b.keys() == one.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same global batches and noise: only the order of float sums differs from one process
    # Adam turns the reduction-order noise of near-zero gradients into lr-sized steps, so
    # compare the bulk: wrong batches or noise would move nearly every weight differently.
    diff = torch.cat([(a[k] - one[k]).abs().flatten() for k in a])
    print("2 ranks vs 1 process: median", float(diff.median()), "share > 1e-4", float((diff > 1e-4).float().mean()))
    assert float(diff.median()) < 1e-6 and float((diff > 1e-4).float().mean()) < 0.01
    torch.manual_seed(0)  # the run's seed: the weights every rank started from
    from ldm.config import AutoencoderConfig
    from ldm.models.autoencoder import AutoencoderKL
    start = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16)).state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 0.02  # they did train
    assert (out / "vae.safetensors").is_file()  # rank 0 wrote the export
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # only rank 0 logged
