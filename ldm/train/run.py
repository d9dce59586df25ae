"""Entry points behind scripts/train_vae.py and scripts/train_ldm.py (single process or torchrun)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from ldm.config import ConfigError, to_dict
from ldm.train.cli import set_threads
from ldm.train.config import LDMTrainConfig, VAETrainConfig
from ldm.train.data import build_dataset, make_batches, map_batches
from ldm.train.distributed import DistInfo, barrier, init_distributed, shutdown
from ldm.train.loop import Task, Trainer

# (config, process info, output folder) -> (task, batches_from)
Setup = Callable[[Any, DistInfo, Path], tuple[Task, Callable[[int], Iterator]]]


def _write_config(out: Path, config_dict: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config_dict, sort_keys=False))
    tmp.replace(out / "config.yaml")


def _train(config: Any, out: Path, resume: str | None, progress: bool, setup: Setup) -> Path:
    """Join the job, build the stage, train it, leave the job; returns the exported model file."""
    info = init_distributed(config.run.device)
    try:
        set_threads(config.run.threads)
        config.run.progress = config.run.progress and progress
        task, batches_from = setup(config, info, out)
        trainer = Trainer(task, config.run, config.ema, info, out, to_dict(config), batches_from, resume)
        if info.is_main:
            _write_config(out, to_dict(config))
        trainer.fit()
        barrier(info)
        return out / task.export_name
    finally:
        shutdown(info)


def _vae_setup(config: VAETrainConfig, info: DistInfo, out: Path):
    from ldm.train.vae import VAETask
    batches_from, preview = make_batches(config.data, config.run.batch_size, config.run.seed, info)
    return VAETask(config, info.device, preview), batches_from


def _ldm_setup(config: LDMTrainConfig, info: DistInfo, out: Path):
    """Stage 2 reads images, or cached latent moments when ldm.cache_latents."""
    from ldm.train.ldm import LDMTask
    task = LDMTask(config, info, cached=config.ldm.cache_latents)
    if not config.ldm.cache_latents:
        return task, make_batches(config.data, config.run.batch_size, config.run.seed, info)[0]
    if config.data.kind != "folder" or config.data.crop == "random":
        raise ConfigError("ldm.cache_latents needs data.kind=folder and data.crop=center "
                          "(a cache holds one crop per image)")
    from ldm.data.latents import fingerprint, load_or_encode
    dataset = build_dataset(config.data)
    bf16 = config.run.precision == "bf16"
    key = fingerprint(config.ldm.vae, dataset, config.data.flip, bf16)
    cache = load_or_encode(out / "latents.safetensors", key, dataset, task.autoencoder, info.device,
                           config.data.flip, bf16, write=info.is_main,
                           progress=info.is_main and config.run.progress)
    return task, map_batches(cache, config.run.batch_size, config.run.seed, info, 0)


def train_vae(config: VAETrainConfig, out: Path, resume: str | None = None, progress: bool = True) -> Path:
    """Stage 1; returns the exported VAE file (out/vae.safetensors)."""
    return _train(config, out, resume, progress, _vae_setup)


def train_ldm(config: LDMTrainConfig, out: Path, resume: str | None = None, progress: bool = True) -> Path:
    """Stage 2; returns the exported full checkpoint (out/model.safetensors)."""
    return _train(config, out, resume, progress, _ldm_setup)
