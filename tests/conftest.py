"""What several test files share: where things are, tiny model configs, comparison helpers."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch

from ldm.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
# The reference fixtures sit beside the repository (../shared/fixtures); LDM_FIXTURES overrides.
FIXTURES = Path(os.environ.get("LDM_FIXTURES", ROOT.parent / "shared" / "fixtures"))



def pytest_configure(config: pytest.Config) -> None:
    """Measured decisions (ldm.inference.autotune) go to a folder of this test run, not the
    user's cache, for this process and the scripts it starts."""
    config._ldm_saved_cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ldm-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The caller's cache setting again, and the run's folder removed."""
    shutil.rmtree(os.environ.get("XDG_CACHE_HOME", ""), ignore_errors=True)
    saved = getattr(config, "_ldm_saved_cache", None)
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


TINY_UNET = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                       attention_resolutions=[2], num_heads=2, context_dim=16)


def tiny_config(text_layers: int = 2) -> ModelConfig:
    """A random model small enough for the CPU: VAE factor 2, 2-level U-Net, tiny HF-CLIP text
    (32x32 images, 16x16 latents)."""
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": text_layers, "num_attention_heads": 2,
            "max_position_embeddings": 77}
    return ModelConfig(
        autoencoder=AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32),
        unet=UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[2], num_heads=2, context_dim=32),
        text_encoder=TextEncoderConfig(kind="hf_clip", arch="tiny", arch_config=text, layer="last"))


def tiny_pipeline(seed: int = 5) -> "Pipeline":
    """The tiny model (one text layer) with its zero-initialised output convolutions perturbed,
    so images depend on the prompt."""
    from ldm.pipeline import Pipeline
    pipe = Pipeline.from_config(tiny_config(text_layers=1), seed=seed)
    perturb(pipe.unet, 0.02)
    return pipe


def perturb(module: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Every parameter plus scaled Gaussian noise (in place): undoes SD's zero-initialised
    output convolutions, so outputs depend on every layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def close_to_reference(ours: torch.Tensor, ref: torch.Tensor, what: str = "tensor") -> None:
    """The reference fixtures' tolerance: max error <= 1e-4 of the reference's largest magnitude."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours.detach().double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g} > 1e-4 x {scale:.3g}"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module; sys.path is restored afterwards (scripts add the checkout
    to it so that they run uninstalled)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module
