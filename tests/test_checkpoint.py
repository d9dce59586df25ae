"""Checkpoint layout: write/read, config in metadata, strict loading, errors, EMA, stage-1 files."""
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

import ldm
from ldm import checkpoint as ckpt
from ldm.config import TextEncoderConfig
from ldm.errors import CheckpointError, LdmError
from ldm.pipeline import Pipeline

from conftest import tiny_config  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = Pipeline.from_config(tiny_config(), seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # undo SD's zero-init of output convs so outputs are non-trivial
        for p in pipe.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    pipe.save(path)
    return pipe, path


def test_from_config_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = Pipeline.from_config(tiny_config(), seed=1).state_dict()
    b = Pipeline.from_config(tiny_config(), seed=1).state_dict()
    c = Pipeline.from_config(tiny_config(), seed=2).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_roundtrip_rebuilds_from_file_alone(saved):
    pipe, path = saved
    tensors, metadata = ckpt.read_checkpoint(path)
    assert set(tensors) == set(pipe.state_dict())
    assert ckpt.config_from_metadata(metadata) == pipe.config
    loaded = ldm.load_pipeline(path, dtype="fp32")
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32)
    out = pipe.unet(x, t, c)
    assert out.abs().max() > 0
    torch.testing.assert_close(loaded.unet(x, t, c), out)  # bitwise not guaranteed (conv algos)
    torch.testing.assert_close(loaded.encode_prompt(["a dog"]), pipe.encode_prompt(["a dog"]))
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_ckpt_nested_and_flat(saved, tmp_path):
    pipe, path = saved
    tensors, _ = ckpt.read_checkpoint(path)
    for name, obj in (("nested.ckpt", {"state_dict": tensors, "global_step": 5}),
                      ("flat.pt", tensors)):
        torch.save(obj, tmp_path / name)
        loaded = ldm.load_pipeline(tmp_path / name, config=pipe.config, dtype="fp32")
        z = torch.randn(1, 4, 16, 16)
        torch.testing.assert_close(loaded.decode_latents(z), pipe.decode_latents(z))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ldm_pwned_marker",))


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = "/tmp/ldm_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*run code"):
        ckpt.read_checkpoint(path)
    assert not os.path.exists(marker)
    legacy = tmp_path / "evil_legacy.ckpt"
    legacy.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.read_checkpoint(legacy)
    assert not os.path.exists(marker)


def test_truncated_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ckpt.read_checkpoint(cut)
    tensors, _ = ckpt.read_checkpoint(path)
    torch.save(tensors, tmp_path / "whole.ckpt")
    raw = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.read_checkpoint(tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.read_checkpoint(tmp_path / "nope.safetensors")


def test_mismatch_lists_keys_with_counts(saved, tmp_path):
    pipe, path = saved
    tensors, metadata = ckpt.read_checkpoint(path)
    del tensors["model.diffusion_model.out.2.weight"]
    tensors["model.diffusion_model.extra.weight"] = torch.zeros(1)
    tensors["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    bad = tmp_path / "bad.safetensors"
    ckpt.write_checkpoint(bad, tensors, metadata)
    with pytest.raises(CheckpointError) as err:
        ldm.load_pipeline(bad)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing key(s): model.diffusion_model.out.2.weight" in msg
    assert "1 unexpected key(s): model.diffusion_model.extra.weight" in msg
    assert "first_stage_model.quant_conv.bias [3] (model wants [8])" in msg


def test_family_hint_when_config_is_wrong_family(saved):
    pipe, path = saved  # hf_clip text encoder = SD 1.x layout
    other = tiny_config()
    other.text_encoder = TextEncoderConfig(kind="open_clip", arch="x", arch_config={
        "embed_dim": 32, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                      "heads": 2, "layers": 1}})
    with pytest.raises(CheckpointError, match="looks like an SD 1.x checkpoint: use an SD 1.x"):
        ldm.load_pipeline(path, config=other)


def test_ema_weights(saved, tmp_path):
    pipe, path = saved
    ema = {k: torch.full_like(v, 0.5) for k, v in pipe.unet.named_parameters()}
    ema_path = tmp_path / "ema.safetensors"
    pipe.save(ema_path, ema_unet=ema)
    tensors, _ = ckpt.read_checkpoint(ema_path)
    assert "model_ema.diffusion_modelinput_blocks00weight" in tensors  # SD's LitEma naming
    plain = ldm.load_pipeline(ema_path, dtype="fp32")
    assert torch.equal(plain.unet.out[2].bias, pipe.unet.out[2].bias)
    with_ema = ldm.load_pipeline(ema_path, use_ema=True, dtype="fp32")
    assert with_ema.unet.out[2].bias.eq(0.5).all()
    with pytest.raises(CheckpointError, match="no EMA weights"):
        ldm.load_pipeline(path, use_ema=True)


def test_schedule_buffer_mismatch(saved, tmp_path):
    pipe, path = saved
    tensors, metadata = ckpt.read_checkpoint(path)
    cfg = tiny_config()
    cfg.diffusion.beta_schedule = "linear"
    with pytest.raises(CheckpointError, match="schedule buffer 'betas'"):
        ldm.load_pipeline(path, config=cfg)


def test_load_autoencoder_stage1_and_full(saved, tmp_path):
    pipe, path = saved
    stage1 = tmp_path / "vae.safetensors"
    weights = ckpt.collect_state_dict(autoencoder=pipe.autoencoder)
    ckpt.write_checkpoint(stage1, weights, ckpt.config_metadata(pipe.config.autoencoder))
    for file in (stage1, path):
        vae, cfg, meta = ckpt.load_autoencoder(file)
        assert cfg == pipe.config.autoencoder and "ldm_config" in meta
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(vae.encode(x).mean, pipe.autoencoder.encode(x).mean)


def test_unknown_config_key_one_clear_error(tmp_path):
    from ldm.config import ConfigError
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  model_channel: 32\n")
    with pytest.raises(ConfigError, match="unknown key.*model_channel") as err:
        Pipeline.from_config(bad)
    assert isinstance(err.value, LdmError) and "\n" not in str(err.value)


def test_repeated_config_key_one_clear_error(tmp_path):
    # PyYAML keeps the last of two equal keys; a stale pasted line must not silently replace
    # a whole section.
    from ldm.config import ConfigError
    bad = tmp_path / "dup.yaml"
    bad.write_text("unet:\n  model_channels: 32\nunet:\n  model_channels: 64\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'unet' \(line 3\)") as err:
        Pipeline.from_config(bad)
    assert "\n" not in str(err.value)


def test_strict_yaml_keeps_merge_keys_and_reads_every_shipped_config():
    from ldm.config import parse_yaml
    merged = parse_yaml("base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  b: 3\n")
    assert merged["derived"] == {"a": 1, "b": 3}
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        assert isinstance(parse_yaml(path.read_text()), dict), path


def test_write_checkpoint_gives_the_umask_permissions_and_leaves_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.write_checkpoint(tmp_path / "x.safetensors", {"a": torch.zeros(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_write_checkpoint_rejects_non_string_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="strings"):
        ckpt.write_checkpoint(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"n": 3})
    assert not list(tmp_path.iterdir())


def test_text_encoder_weights_from_local_files(saved, tmp_path):
    from safetensors.torch import save_file
    pipe, path = saved
    # an HF CLIPModel-style file: text_model.* plus image-tower keys that must be ignored
    hf = {k.removeprefix("transformer."): v.clone() + 1 for k, v in pipe.text_encoder.state_dict().items()}
    hf["vision_model.embeddings.class_embedding"] = torch.zeros(4)
    save_file(hf, tmp_path / "clip.safetensors")
    cfg = tiny_config()
    cfg.text_encoder.weights = str(tmp_path / "clip.safetensors")
    fresh = Pipeline.from_config(cfg, seed=9)
    key = "transformer.text_model.final_layer_norm.weight"
    torch.testing.assert_close(fresh.text_encoder.state_dict()[key], hf[key.removeprefix("transformer.")])
    # our own full checkpoint also works as a source of text-tower weights
    cfg.text_encoder.weights = str(path)
    torch.testing.assert_close(Pipeline.from_config(cfg).encode_prompt(["x"]), pipe.encode_prompt(["x"]))
    # a file for another architecture is a clear error
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 3)}, tmp_path / "bad.safetensors")
    cfg.text_encoder.weights = str(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="text encoder weights .*missing key"):
        Pipeline.from_config(cfg)


def test_open_clip_weights_from_clip_file(tmp_path):
    from safetensors.torch import save_file

    from ldm.models.text_encoder import build_text_encoder
    arch = {"embed_dim": 16, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                          "heads": 2, "layers": 1}}
    cfg = TextEncoderConfig(kind="open_clip", arch="t", arch_config=arch)
    source = build_text_encoder(cfg)
    clip = {k.removeprefix("model."): v + 0.5 for k, v in source.state_dict().items()}
    clip["visual.proj"] = torch.zeros(2, 2)
    save_file(clip, tmp_path / "open_clip.safetensors")
    target = build_text_encoder(cfg)
    ckpt.load_text_encoder_weights(target, tmp_path / "open_clip.safetensors")
    torch.testing.assert_close(target.model.ln_final.bias, clip["ln_final.bias"])


def test_pipeline_to_and_dtype_on_load(saved):
    pipe, path = saved
    half = ldm.load_pipeline(path, dtype=torch.bfloat16)
    assert half.unet.out[2].weight.dtype == torch.bfloat16
    assert half.encode_prompt(["a"]).dtype == torch.bfloat16
    back = half.to(dtype=torch.float32)
    assert back is half and half.autoencoder.decoder.conv_out.weight.dtype == torch.float32
    z = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(half.decode_latents(z), pipe.decode_latents(z), atol=0.1, rtol=0.05)


def test_sd1_variants_in_the_wild(saved, tmp_path):
    """Old transformers layout (no `text_model.`), float or absent position_ids."""
    pipe, path = saved
    tensors, metadata = ckpt.read_checkpoint(path)
    key = "cond_stage_model." + ckpt.HF_POSITION_IDS
    variants = {
        "old_layout": {k.replace("transformer.text_model.", "transformer."): v for k, v in tensors.items()},
        "float_ids": {**tensors, key: tensors[key].float() + 0.001},
        "no_ids": {k: v for k, v in tensors.items() if k != key},
    }
    for name, variant in variants.items():
        file = tmp_path / f"{name}.safetensors"
        ckpt.write_checkpoint(file, variant, metadata)
        if name == "old_layout":
            assert ckpt.detect_family(variant) == "sd1"
        loaded = ldm.load_pipeline(file, dtype="fp32")
        torch.testing.assert_close(loaded.encode_prompt(["a cat"]), pipe.encode_prompt(["a cat"]))


def test_safetensors_header_starting_like_a_pickle(tmp_path):
    """A header length of 128 mod 256 makes the first byte 0x80, the legacy pickle magic."""
    path = tmp_path / "x.safetensors"
    for pad in range(64):
        ckpt.write_checkpoint(path, {"a": torch.arange(3.0)}, {"ldm_config": "{}", "pad": "p" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a 0x80 first byte")
    tensors, metadata = ckpt.read_checkpoint(path)
    assert metadata["pad"] == "p" * pad and torch.equal(tensors["a"], torch.arange(3.0))
