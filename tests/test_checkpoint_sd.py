"""SD inference YAML translation, family detection and mismatch hints against the fixtures."""

import pytest
import yaml

import ldm
from ldm import checkpoint as ckpt
from ldm.config import ConfigError
from ldm.errors import CheckpointError
from ldm.pipeline import resolve_config
from ldm.presets import sd1, sd2, sd2_inpainting, x4_upscaler
from ldm.sd_yaml import load_sd_yaml, translate_sd_yaml
from conftest import FIXTURES

SD2_YAML = FIXTURES / "sd2_dev" / "tiny_dev.yaml"
SD1_YAML = FIXTURES / "sd1_dev" / "tiny_sd1.yaml"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="reference fixtures not present")


def _v2_inference(parameterization: str | None = None) -> dict:
    """The networks part of Stability-AI's v2-inference(-v).yaml, as a mapping."""
    params = {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "num_timesteps_cond": 1, "log_every_t": 200, "first_stage_key": "jpg",
        "cond_stage_key": "txt", "image_size": 64, "channels": 4, "cond_stage_trainable": False,
        "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema", "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4,
            "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
            "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": 1, "context_dim": 1024, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                         "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                         "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}},
    }
    if parameterization:
        params["parameterization"] = parameterization
    return {"model": {"base_learning_rate": 1e-4,
                      "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def test_v2_inference_yaml_equals_our_sd2_config():
    assert translate_sd_yaml(_v2_inference()) == sd2()
    assert translate_sd_yaml(_v2_inference("v")) == sd2("v")


def test_v1_inference_yaml_equals_our_sd1_config():
    data = _v2_inference()
    params = data["model"]["params"]
    params["unet_config"]["params"].update(num_heads=8, context_dim=768)
    for key in ("num_head_channels", "use_linear_in_transformer", "use_fp16"):
        del params["unet_config"]["params"][key]
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    params["scheduler_config"] = {"target": "ldm.lr_scheduler.LambdaLinearScheduler"}
    assert translate_sd_yaml(data) == sd1()


def test_v2_inpainting_inference_yaml_equals_our_config():
    data = _v2_inference()
    data["model"]["target"] = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    params = data["model"]["params"]
    params.update(conditioning_key="hybrid", finetune_keys=None)
    params["unet_config"]["params"]["in_channels"] = 9
    del params["unet_config"]["params"]["use_fp16"]
    assert translate_sd_yaml(data) == sd2_inpainting()
    params["unet_config"]["params"]["in_channels"] = 4  # a text-to-image U-Net cannot inpaint
    with pytest.raises(ConfigError, match="in_channels 4 does not fit conditioning 'inpaint'"):
        translate_sd_yaml(data)


# The networks part of Stability-AI's x4-upscaling.yaml.
_X4_UPSCALING = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentUpscaleDiffusion
  params:
    parameterization: "v"
    low_scale_key: "lr"
    linear_start: 0.0001
    linear_end: 0.02
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 128
    channels: 4
    cond_stage_trainable: false
    conditioning_key: "hybrid-adm"
    monitor: val/loss_simple_ema
    scale_factor: 0.08333
    use_ema: False
    low_scale_config:
      target: ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation
      params:
        noise_schedule_config: # image space
          linear_start: 0.0001
          linear_end: 0.02
        max_noise_level: 350
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        num_classes: 1000  # timesteps for noise conditioning (here constant, just need one)
        image_size: 128
        in_channels: 7
        out_channels: 4
        model_channels: 256
        attention_resolutions: [ 2,4,8]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 2, 4]
        disable_self_attentions: [True, True, True, False]
        disable_middle_self_attn: False
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
        use_linear_in_transformer: True
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: True
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1,2,4 ]  # num_down = len(ch_mult)-1
          num_res_blocks: 2
          attn_resolutions: [ ]
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def test_x4_upscaling_yaml_equals_our_config():
    assert translate_sd_yaml(yaml.safe_load(_X4_UPSCALING)) == x4_upscaler()
    data = yaml.safe_load(_X4_UPSCALING)
    data["model"]["params"]["conditioning_key"] = "hybrid"
    with pytest.raises(ConfigError, match="conditioning_key 'hybrid' is not supported with "
                                          "LatentUpscaleDiffusion"):
        translate_sd_yaml(data)
    data = yaml.safe_load(_X4_UPSCALING)
    data["model"]["target"] = "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion"
    with pytest.raises(ConfigError, match="LatentDepth2ImageDiffusion.*is not one of"):
        translate_sd_yaml(data)


def test_plain_latent_diffusion_refuses_upscaler_options():
    data = _v2_inference()
    data["model"]["params"]["unet_config"]["params"]["num_classes"] = 1000
    with pytest.raises(ConfigError, match="num_classes.*allowed only there"):
        translate_sd_yaml(data)
    data = _v2_inference()
    data["model"]["params"]["low_scale_config"] = {}
    with pytest.raises(ConfigError, match="unsupported key.*low_scale_config"):
        translate_sd_yaml(data)


def test_tiny_yaml_translation():
    sd2_cfg = load_sd_yaml(SD2_YAML)
    assert sd2_cfg.text_encoder.kind == "open_clip" and sd2_cfg.text_encoder.layer == "penultimate"
    assert sd2_cfg.text_encoder.arch_config["text_cfg"]["width"] == 64  # from the JSON beside it
    assert sd2_cfg.unet.num_head_channels == 16 and sd2_cfg.unet.use_linear_in_transformer
    assert sd2_cfg.diffusion.beta_schedule == "scaled_linear"  # SD's "linear" is sqrt-linear
    sd1_cfg = load_sd_yaml(SD1_YAML)
    assert sd1_cfg.text_encoder.kind == "hf_clip" and sd1_cfg.text_encoder.arch_config["hidden_size"] == 48
    assert sd1_cfg.unet.num_heads == 4 and sd1_cfg.autoencoder.ch_mult == [1, 2]


def test_sd_yaml_unknown_key_is_one_clear_error(tmp_path):
    data = yaml.safe_load(SD2_YAML.read_text())
    data["model"]["params"]["unet_config"]["params"]["use_fancy_thing"] = True
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="unet_config: unsupported key.*use_fancy_thing") as err:
        resolve_config(bad)
    assert "\n" not in str(err.value)


def test_unsupported_sd_option(tmp_path):
    data = _v2_inference()
    data["model"]["params"]["unet_config"]["params"]["use_scale_shift_norm"] = True
    with pytest.raises(ConfigError, match="use_scale_shift_norm"):
        translate_sd_yaml(data)


def test_unknown_open_clip_arch_never_downloads(tmp_path):
    data = _v2_inference()
    data["model"]["params"]["cond_stage_config"]["params"]["arch"] = "no-such-arch"
    with pytest.raises(ConfigError, match="no-such-arch.*beside the YAML"):
        translate_sd_yaml(data, base_dir=tmp_path)


def test_detect_family_and_presets():
    tensors1, _ = ckpt.read_checkpoint(FIXTURES / "sd1_dev" / "tiny_sd1.safetensors")
    tensors2, _ = ckpt.read_checkpoint(FIXTURES / "sd2_dev" / "tiny_dev.safetensors")
    assert ckpt.detect_family(tensors1) == "sd1" and ckpt.detect_family(tensors2) == "sd2"
    assert resolve_config(None, tensors1, {}) == sd1()
    with pytest.warns(UserWarning, match="assuming SD 2.x"):
        assert resolve_config(None, tensors2, {}) == sd2()
    inpaint, _ = ckpt.read_checkpoint(FIXTURES / "editing_dev" / "tiny_inpaint.safetensors")
    x4, _ = ckpt.read_checkpoint(FIXTURES / "editing_dev" / "tiny_x4.safetensors")
    assert [ckpt.detect_conditioning(t) for t in (tensors1, tensors2, inpaint, x4)] == \
        ["crossattn", "crossattn", "inpaint", "upscale"]
    assert resolve_config(None, inpaint, {}) == sd2_inpainting()
    assert resolve_config(None, x4, {}) == x4_upscaler()


def test_checkpoint_config_mismatch_names_keys_and_family():
    with pytest.raises(CheckpointError) as err:
        ldm.load_pipeline(FIXTURES / "sd1_dev" / "tiny_sd1.safetensors", config=SD2_YAML)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing key(s): " in msg and "cond_stage_model.model." in msg
    assert "unexpected key(s): " in msg and "more)" in msg
    assert msg.endswith("this looks like an SD 1.x checkpoint: use an SD 1.x config (configs/sd1.yaml)")


def test_same_family_size_mismatch_lists_shapes():
    # the tiny SD 2.x checkpoint with the full-size SD 2.x config: right family, wrong sizes
    with pytest.raises(CheckpointError, match=r"mis-shaped key\(s\): .*\(model wants \[") as err:
        ldm.load_pipeline(FIXTURES / "sd2_dev" / "tiny_dev.safetensors", config="sd2")
    assert "looks like" not in str(err.value)


def test_open_clip_arch_from_model_config_json(tmp_path):
    import shutil
    shutil.copy(FIXTURES / "sd2_dev" / "tiny-dev-openclip.json", tmp_path / "tower.json")
    cfg = load_sd_yaml(SD2_YAML)
    cfg.text_encoder.arch_config, cfg.text_encoder.arch = None, "tower.json"
    from ldm.config import to_dict
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    resolved = resolve_config(tmp_path / "model.yaml")
    assert resolved.text_encoder.arch == "tower"
    assert resolved.text_encoder.arch_config == load_sd_yaml(SD2_YAML).text_encoder.arch_config
    pipe = ldm.load_pipeline(FIXTURES / "sd2_dev" / "tiny_dev.safetensors", config=tmp_path / "model.yaml")
    assert pipe.encode_prompt(["a"]).shape == (1, 77, 64)
