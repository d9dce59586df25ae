"""scripts/export_default_model.py: fp16 weights, config kept, loads strictly, size limit."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("export_default_model")


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        autoencoder=AutoencoderConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=4, embed_dim=4,
                                      resolution=16),
        unet=UNetConfig(model_channels=32, channel_mult=[1], num_res_blocks=1, attention_resolutions=[1],
                        num_heads=1, context_dim=32, use_linear_in_transformer=True),
        text_encoder=TextEncoderConfig(kind="open_clip", layer="last", max_length=8, trainable=True, arch_config={
            "embed_dim": 32, "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}))


def test_export_halves_weights_and_still_loads(tmp_path):
    import ldm
    from ldm.checkpoint import read_checkpoint
    from ldm.pipeline import Pipeline

    source = tmp_path / "model.safetensors"
    Pipeline.from_config(_tiny_config(), seed=1).save(source)
    out = tmp_path / "shipped.safetensors"
    ev = _script()
    assert ev.main([str(source), "--out", str(out), "--note", "test"]) == 0
    before, meta_before = read_checkpoint(source)
    after, meta_after = read_checkpoint(out)
    assert set(before) == set(after)
    assert json.loads(meta_after["ldm_config"]) == json.loads(meta_before["ldm_config"]) and meta_after["ldm_note"] == "test"
    networks = [k for k in after if k.startswith(("first_stage_model.", "model.diffusion_model.", "cond_stage_model."))]
    assert networks and all(after[k].dtype == torch.float16 for k in networks if after[k].is_floating_point())
    assert any(v.dtype != torch.float16 for k, v in after.items() if k not in networks)  # schedule buffers kept
    assert out.stat().st_size < 0.6 * source.stat().st_size
    # fp16 rounding only: the loaded pipeline's weights match the source's within fp16 precision.
    a, b = ldm.load_pipeline(source), ldm.load_pipeline(out)
    for (name, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        assert q.dtype == torch.float32 and torch.allclose(p, q, rtol=1e-3, atol=1e-4), name


def test_export_refuses_oversized_and_bad_input(tmp_path, capsys):
    from ldm.pipeline import Pipeline

    source = tmp_path / "model.safetensors"
    Pipeline.from_config(_tiny_config(), seed=1).save(source)
    ev = _script()
    assert ev.main([str(source), "--out", str(tmp_path / "x.safetensors"), "--max-mb", "0.5"]) == 2
    assert "would take" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert ev.main([str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
