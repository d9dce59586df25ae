"""Full-size SD models built from configs/*.yaml on the meta device: exact SD keys, shapes, counts."""
import json
import sys
from pathlib import Path

import pytest
import torch

from ldm import checkpoint as ckpt
from ldm.config import ModelConfig, load_yaml
from ldm.diffusion.noise_augmentation import low_scale_buffers, make_noise_augmentation
from ldm.diffusion.schedule import make_schedule, sd_buffers
from ldm.models.layers import count_parameters
from ldm.pipeline import build_networks
from ldm.presets import PRESETS
from conftest import FIXTURES, load_script

KEYS = FIXTURES / "keys"
ROOT = Path(__file__).resolve().parent.parent


def meta_state_dict(config: ModelConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        autoencoder, unet, text_encoder = build_networks(config)
    low_scale = (low_scale_buffers(make_noise_augmentation(config.noise_augmentation))
                 if config.noise_augmentation is not None else None)
    return ckpt.collect_state_dict(autoencoder, unet, text_encoder,
                                   sd_buffers(make_schedule(config.diffusion)),
                                   low_scale_buffers=low_scale)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_files_mirror_presets(name):
    assert load_yaml(ModelConfig, ROOT / "configs" / f"{name}.yaml") == PRESETS[name]()


@pytest.mark.skipif(not KEYS.is_dir(), reason="key fixtures not present")
@pytest.mark.parametrize("name,keys_file", [("sd1", "sd1_keys.json"), ("sd2", "sd2_keys.json"),
                                            ("sd2-v", "sd2_keys.json"),
                                            ("sd2-inpainting", "sd2_inpainting_keys.json"),
                                            ("x4-upscaler", "x4_upscaler_keys.json")])
def test_full_size_keys_and_shapes(name, keys_file):
    expected = json.loads((KEYS / keys_file).read_text())["keys"]
    ours = meta_state_dict(load_yaml(ModelConfig, ROOT / "configs" / f"{name}.yaml"))
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    wrong = {k: (list(v.shape), expected[k]["shape"]) for k, v in ours.items()
             if list(v.shape) != expected[k]["shape"]}
    assert wrong == {}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in ours.items()}
    assert {k: d for k, d in dtypes.items() if d != expected[k]["dtype"]} == {}


@pytest.mark.parametrize("name,unet_params", [("sd1", 859_520_964), ("sd2", 865_910_724)])
def test_published_parameter_counts(name, unet_params):
    with torch.device("meta"):
        autoencoder, unet, _ = build_networks(PRESETS[name]())
    assert count_parameters(unet) == unet_params  # 859.5M / 865.9M
    assert round(count_parameters(autoencoder) / 1e6, 2) == 83.65


def test_count_params_script(capsys, monkeypatch):
    script = load_script("count_params")
    monkeypatch.setattr(sys, "argv", ["count_params.py"])
    assert script.main() == 0
    out = capsys.readouterr().out
    assert "865.9M" in out and "859.5M" in out and "83.65M" in out
    monkeypatch.setattr(sys, "argv", ["count_params.py", "no-such-config"])
    assert script.main() == 2
    assert capsys.readouterr().err.startswith("error: config not found: no-such-config")
