"""Entry points behind scripts/train_vae.py and scripts/train_ldm.py (single process or torchrun)."""
from __future__ import annotations

from pathlib import Path

import yaml

from ldm.config import ConfigError, to_dict
from ldm.train.cli import set_threads
from ldm.train.config import LDMTrainConfig, VAETrainConfig
from ldm.train.data import build_dataset, make_batches, map_batches
from ldm.train.distributed import barrier, init_distributed, shutdown
from ldm.train.loop import Trainer


def _write_config(out: Path, config_dict: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config_dict, sort_keys=False))
    tmp.replace(out / "config.yaml")


def train_vae(config: VAETrainConfig, out: Path, resume: str | None = None, progress: bool = True) -> Path:
    """Stage 1; returns the exported VAE file (out/vae.safetensors)."""
    from ldm.train.vae import VAETask
    info = init_distributed(config.run.device)
    try:
        set_threads(config.run.threads)
        config.run.progress = config.run.progress and progress
        batches_from, preview = make_batches(config.data, config.run.batch_size, config.run.seed, info)
        task = VAETask(config, info.device, preview)
        trainer = Trainer(task, config.run, config.ema, info, out, to_dict(config), batches_from, resume)
        if info.is_main:
            _write_config(out, to_dict(config))
        trainer.fit()
        barrier(info)
        return out / task.export_name
    finally:
        shutdown(info)


def _ldm_batches(config: LDMTrainConfig, task, info):
    """batches_from for stage 2: images, or cached latent moments when ldm.cache_latents."""
    if not config.ldm.cache_latents:
        return make_batches(config.data, config.run.batch_size, config.run.seed, info)[0]
    if config.data.kind != "folder" or config.data.crop == "random":
        raise ConfigError("ldm.cache_latents needs data.kind=folder and data.crop=center "
                          "(a cache holds one crop per image)")
    from ldm.data.latents import encode_dataset
    dataset = build_dataset(config.data)
    cache = encode_dataset(dataset, task.autoencoder, info.device, config.data.flip)
    return map_batches(cache, config.run.batch_size, config.run.seed, info, 0)


def train_ldm(config: LDMTrainConfig, out: Path, resume: str | None = None, progress: bool = True) -> Path:
    """Stage 2; returns the exported full checkpoint (out/model.safetensors)."""
    from ldm.train.ldm import LDMTask
    info = init_distributed(config.run.device)
    try:
        set_threads(config.run.threads)
        config.run.progress = config.run.progress and progress
        task = LDMTask(config, info, cached=config.ldm.cache_latents)
        batches_from = _ldm_batches(config, task, info)
        trainer = Trainer(task, config.run, config.ema, info, out, to_dict(config), batches_from, resume)
        if info.is_main:
            _write_config(out, to_dict(config))
        trainer.fit()
        barrier(info)
        return out / task.export_name
    finally:
        shutdown(info)
