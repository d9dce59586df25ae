"""SD 2 inpainting and the x4 upscaler, model side: the tiny fixtures (fixtures/editing_dev) load
strictly and their raw U-Net calls and low-res noise augmentation reproduce the reference."""
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ldm
from ldm import checkpoint as ckpt
from ldm.config import ConfigError, ModelConfig, check_model_config, from_dict, to_dict
from ldm.diffusion.noise_augmentation import low_scale_buffers, noise_low_res
from ldm.diffusion.schedule import sd_buffers
from ldm.errors import CheckpointError
from ldm.prediction import PredictionType, to_x0_eps
from ldm.sd_yaml import load_sd_yaml
from conftest import FIXTURES, close_to_reference

EDIT = FIXTURES / "editing_dev"
INPAINT = (EDIT / "tiny_inpaint.safetensors", EDIT / "tiny_inpaint.yaml")
X4 = (EDIT / "tiny_x4.safetensors", EDIT / "tiny_x4.yaml")
pytestmark = pytest.mark.skipif(not EDIT.is_dir(), reason="editing fixtures not present")


@pytest.fixture(scope="module")
def inpaint():
    return ldm.load_pipeline(*INPAINT, dtype="fp32"), load_file(EDIT / "tiny_inpaint_ref.safetensors")


@pytest.fixture(scope="module")
def x4():
    return ldm.load_pipeline(*X4, dtype="fp32"), load_file(EDIT / "tiny_x4_ref.safetensors")


def test_inpaint_config_translation():
    config = load_sd_yaml(INPAINT[1])
    assert config.conditioning == "inpaint" and config.noise_augmentation is None
    assert config.unet.in_channels == 9 and config.concat_channels == 5
    assert config.diffusion.prediction_type == "eps" and config.unet.num_classes is None


def test_x4_config_translation():
    config = load_sd_yaml(X4[1])
    assert config.conditioning == "upscale" and config.concat_channels == 3
    assert config.unet.num_classes == 1000 and config.unet.in_channels == 7
    assert config.unet.disable_self_attentions == [True, True, False]
    assert config.diffusion.prediction_type == "v" and config.diffusion.scale_factor == 0.08333
    aug = config.noise_augmentation
    assert (aug.beta_schedule, aug.linear_start, aug.linear_end, aug.max_noise_level) == \
        ("scaled_linear", 1e-4, 2e-2, 350)


def test_inpaint_unet_raw_output(inpaint):
    pipe, ref = inpaint
    x = torch.cat([ref["inputs.unet_x"], ref["inputs.unet_c_concat"]], dim=1)  # [x, mask, latent]
    with torch.no_grad():
        out = pipe.unet(x, ref["inputs.unet_t"], ref["inputs.unet_c"])
    close_to_reference(out, ref["unet.out"], "inpainting U-Net")


def test_x4_unet_raw_output_and_v_prediction(x4):
    pipe, ref = x4
    x_t = ref["inputs.unet_x"]
    x = torch.cat([x_t, ref["inputs.unet_c_concat"]], dim=1)  # [x, noisy low-res RGB]
    with torch.no_grad():
        out = pipe.unet(x, ref["inputs.unet_t"], ref["inputs.unet_c"], y=ref["inputs.unet_y"])
    close_to_reference(out, ref["unet.out"], "x4 U-Net")
    abar = pipe.schedule.alphas_cumprod[ref["inputs.unet_t"]][:, None, None, None]
    x0, eps = to_x0_eps(x_t.double(), out.double(), abar.sqrt(), (1 - abar).sqrt(), PredictionType.V)
    close_to_reference(x0, ref["unet.pred_x0"], "x4 pred_x0")
    close_to_reference(eps, ref["unet.pred_eps"], "x4 pred_eps")


def test_x4_unet_needs_its_noise_level(x4):
    pipe, ref = x4
    x = torch.cat([ref["inputs.unet_x"], ref["inputs.unet_c_concat"]], dim=1)
    with pytest.raises(ValueError, match="num_classes"):
        pipe.unet(x, ref["inputs.unet_t"], ref["inputs.unet_c"])


def test_x4_attn1_attends_to_the_text(x4):
    pipe, _ = x4
    width = pipe.config.unet.context_dim
    # attention at levels 1 (ds 2, attn1 disabled) and 2 (ds 4, kept), and in the middle (kept)
    disabled = pipe.unet.input_blocks[3][1].transformer_blocks[0].attn1
    kept = [pipe.unet.input_blocks[5][1], pipe.unet.middle_block[1]]
    assert disabled.to_k.in_features == width
    assert all(t.transformer_blocks[0].attn1.to_k.in_features != width for t in kept)


def test_x4_noise_augmentation(x4):
    pipe, ref = x4
    aug = pipe.noise_augmentation
    assert aug.max_noise_level == 350
    x_aug = noise_low_res(aug, ref["x4.lr"], ref["x4.noise_level"], ref["x4.aug_noise"])
    close_to_reference(x_aug, ref["x4.x_aug"], "noise-augmented low-res image")
    same = noise_low_res(aug, ref["x4.lr"], int(ref["x4.noise_level"][0]), ref["x4.aug_noise"])
    assert torch.equal(same, x_aug)
    for name, ours in low_scale_buffers(aug).items():
        close_to_reference(ours, ref[f"low_scale_schedule.{name}"], name)
    with pytest.raises(ValueError, match="noise_level must lie in 0..999"):
        noise_low_res(aug, ref["x4.lr"], 1000, ref["x4.aug_noise"])


@pytest.mark.parametrize("which", ["inpaint", "x4"])
def test_schedule_buffers(which, request):
    pipe, ref = request.getfixturevalue(which)
    for name, ours in sd_buffers(pipe.schedule).items():
        close_to_reference(ours, ref[f"schedule.{name}"], name)


def test_x4_save_round_trip_keeps_sd_layout(x4, tmp_path):
    pipe, _ = x4
    path = tmp_path / "x4.safetensors"
    pipe.save(path)
    tensors, _ = ckpt.read_checkpoint(path)
    assert set(tensors) == set(load_file(X4[0]))  # low_scale_model.* included
    loaded = ldm.load_pipeline(path, dtype="fp32")  # the stored config alone rebuilds it
    assert loaded.config == pipe.config and loaded.noise_augmentation is not None


def test_x4_low_scale_buffers_checked_against_config(tmp_path):
    tensors = load_file(X4[0])
    tensors["low_scale_model.betas"] = tensors["low_scale_model.betas"] * 2
    bad = tmp_path / "bad.safetensors"
    ckpt.write_checkpoint(bad, tensors)
    with pytest.raises(CheckpointError, match="'low_scale_model.betas' differs.*noise_augmentation"):
        ldm.load_pipeline(bad, config=X4[1])


def test_low_scale_buffers_unexpected_without_upscaling(tmp_path):
    tensors = load_file(INPAINT[0])
    tensors["low_scale_model.betas"] = torch.zeros(1000)
    bad = tmp_path / "bad.safetensors"
    ckpt.write_checkpoint(bad, tensors)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): low_scale_model.betas"):
        ldm.load_pipeline(bad, config=INPAINT[1])


def _text_to_image_yaml(tmp_path):
    """The tiny inpainting YAML turned into a plain LatentDiffusion one (4 input channels)."""
    data = yaml.safe_load(INPAINT[1].read_text())
    data["model"]["target"] = "ldm.models.diffusion.ddpm.LatentDiffusion"
    params = data["model"]["params"]
    params["conditioning_key"] = "crossattn"
    del params["finetune_keys"]
    params["unet_config"]["params"]["in_channels"] = 4
    path = tmp_path / "txt2img.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "tiny-editdev-openclip.json").write_text((EDIT / "tiny-editdev-openclip.json").read_text())
    return path


def test_inpainting_checkpoint_with_text_to_image_config(tmp_path):
    with pytest.raises(CheckpointError) as err:
        ldm.load_pipeline(INPAINT[0], config=_text_to_image_yaml(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 mis-shaped key(s): model.diffusion_model.input_blocks.0.0.weight [32, 9, 3, 3] " \
           "(model wants [32, 4, 3, 3])" in msg
    assert msg.endswith("U-Net takes 9 input channels, the config's 4 (conditioning 'crossattn'): "
                        "this is an inpainting checkpoint, use an inpainting config "
                        "(configs/sd2-inpainting.yaml)")


def test_text_to_image_checkpoint_with_inpainting_config(tmp_path):
    tensors = load_file(INPAINT[0])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = tensors[key][:, :4].contiguous()
    path = tmp_path / "txt2img.safetensors"
    ckpt.write_checkpoint(path, tensors)
    with pytest.raises(CheckpointError) as err:
        ldm.load_pipeline(path, config=INPAINT[1])
    msg = str(err.value)
    assert "[32, 4, 3, 3] (model wants [32, 9, 3, 3])" in msg and "\n" not in msg
    assert msg.endswith("U-Net takes 4 input channels, the config's 9 (conditioning 'inpaint'): "
                        "this is a text-to-image checkpoint, use a text-to-image config "
                        "(configs/sd2.yaml or configs/sd2-v.yaml)")
    assert ldm.load_pipeline(path, config=_text_to_image_yaml(tmp_path)).config.conditioning == "crossattn"


def test_inpaint_yaml_own_keys_strict(tmp_path):
    data = yaml.safe_load(INPAINT[1].read_text())
    (tmp_path / "tiny-editdev-openclip.json").write_text((EDIT / "tiny-editdev-openclip.json").read_text())
    params = data["model"]["params"]
    params.update(concat_keys=["mask", "masked_image"], masked_image_key="masked_image")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(data))
    assert load_sd_yaml(tmp_path / "ok.yaml") == load_sd_yaml(INPAINT[1])
    for key, value, match in (("concat_keys", ["masked_image", "mask"], "concat_keys"),
                              ("low_scale_config", {}, "unsupported key.*low_scale_config"),
                              ("conditioning_key", "crossattn", "conditioning_key 'crossattn'"),
                              ("inpaint_fancy", 1, "unsupported key.*inpaint_fancy")):
        bad = {**data, "model": {**data["model"], "params": {**params, key: value}}}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=match):
            load_sd_yaml(tmp_path / "bad.yaml")


def _x4_variant(tmp_path, edit) -> Path:
    """The tiny x4 YAML after `edit(model_params, unet_params)`, written into tmp_path."""
    data = yaml.safe_load(X4[1].read_text())
    params = data["model"]["params"]
    edit(params, params["unet_config"]["params"])
    (tmp_path / "tiny-editdev-openclip.json").write_text((EDIT / "tiny-editdev-openclip.json").read_text())
    (tmp_path / "x4.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "x4.yaml"


@pytest.mark.parametrize("edit,match", [
    (lambda p, u: p["low_scale_config"]["params"]["noise_schedule_config"].update(gamma=2), "gamma"),
    (lambda p, u: p.pop("low_scale_config"), "needs low_scale_config"),
    (lambda p, u: p.update(noise_level_key="nl"), "noise_level_key"),
    (lambda p, u: u.update(disable_self_attentions=[True, False]), "one entry per level"),
    (lambda p, u: u.update(num_classes="continuous"), "num_classes"),
    (lambda p, u: u.update(num_attention_blocks=[1, 1, 1]), "num_attention_blocks"),
    (lambda p, u: u.update(in_channels=4), "in_channels 4 does not fit"),
], ids=["schedule-key", "no-low-scale", "noise-level-key", "flags", "continuous", "blocks", "channels"])
def test_x4_yaml_keys_strict(tmp_path, edit, match):
    with pytest.raises(ConfigError, match=match):
        load_sd_yaml(_x4_variant(tmp_path, edit))


def test_model_config_rules():
    config = load_sd_yaml(X4[1])
    assert from_dict(ModelConfig, to_dict(config)) == config
    config.noise_augmentation = None
    with pytest.raises(ConfigError, match="noise_augmentation is required"):
        check_model_config(config)
    with pytest.raises(ConfigError, match="conditioning 'paint' is unknown"):
        check_model_config(ModelConfig(conditioning="paint"))
    check_model_config(ModelConfig())  # the defaults: text-to-image
