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
    a, b = ldm.load_pipeline(source, dtype="fp32"), ldm.load_pipeline(out, dtype="fp32")
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


def _teacher_and_student(tmp_path):
    """A teacher exported to fp16 and a 'student': the teacher with its U-Net changed."""
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_config(_tiny_config(), seed=1)
    pipe.save(tmp_path / "model.safetensors")
    assert _script().main([str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "teacher.safetensors")]) == 0
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01)
    pipe.save(tmp_path / "student_full.safetensors")
    return pipe


def test_student_beside_its_teacher_stores_only_its_unet(tmp_path):
    import ldm
    from ldm.checkpoint import read_checkpoint

    _teacher_and_student(tmp_path)
    full, slim = tmp_path / "student_fp16.safetensors", tmp_path / "student.safetensors"
    ev = _script()
    assert ev.main([str(tmp_path / "student_full.safetensors"), "--out", str(full)]) == 0
    assert ev.main([str(tmp_path / "student_full.safetensors"), "--out", str(slim),
                    "--base", str(tmp_path / "teacher.safetensors")]) == 0
    own, meta = read_checkpoint(slim, complete=False)
    assert not any(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in own)
    assert meta["ldm_base"] == "teacher.safetensors" and len(meta["ldm_base_sha256"]) == 64
    assert slim.stat().st_size < full.stat().st_size
    completed, _ = read_checkpoint(slim)
    expected, _ = read_checkpoint(full)
    assert set(completed) == set(expected)
    assert all(torch.equal(completed[k], expected[k]) for k in expected)
    a, b = ldm.load_pipeline(slim, prepare=False), ldm.load_pipeline(full, prepare=False)
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))


def test_missing_or_changed_base_is_one_clear_error(tmp_path):
    import pytest

    from ldm.checkpoint import read_checkpoint
    from ldm.errors import CheckpointError

    _teacher_and_student(tmp_path)
    slim = tmp_path / "student.safetensors"
    teacher = tmp_path / "teacher.safetensors"
    assert _script().main([str(tmp_path / "student_full.safetensors"), "--out", str(slim),
                           "--base", str(teacher)]) == 0
    teacher.rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match="not a file beside it"):
        read_checkpoint(slim)
    (tmp_path / "moved.safetensors").rename(teacher)
    with open(teacher, "ab") as f:   # any other bytes: another (e.g. retrained) teacher
        f.write(b" ")
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(slim)


def test_base_with_other_networks_is_refused(tmp_path, capsys):
    from ldm.pipeline import Pipeline

    _teacher_and_student(tmp_path)
    other = Pipeline.from_config(_tiny_config(), seed=2)    # another VAE and text encoder
    other.save(tmp_path / "other.safetensors")
    ev = _script()
    assert ev.main([str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "s.safetensors"),
                    "--base", str(tmp_path / "teacher.safetensors")]) == 2
    assert "differ from" in capsys.readouterr().err and not (tmp_path / "s.safetensors").exists()
    (tmp_path / "sub").mkdir()
    assert ev.main([str(tmp_path / "student_full.safetensors"), "--out", str(tmp_path / "sub" / "s.safetensors"),
                    "--base", str(tmp_path / "teacher.safetensors")]) == 2
    assert "must be in the folder" in capsys.readouterr().err
