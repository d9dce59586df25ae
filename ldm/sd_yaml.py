"""Translate Stable Diffusion's original inference YAML to ModelConfig: v1/v2-inference.yaml
(LatentDiffusion), v2-inpainting-inference.yaml (LatentInpaintDiffusion), x4-upscaling.yaml
(LatentUpscaleDiffusion).

Only what changes the networks or the process is read; training-only keys are accepted
and ignored; any other key is an error (strict, like our own configs). Facts follow
CompVis/stable-diffusion and Stability-AI/stablediffusion (ddpm.py, openaimodel.py,
autoencoder.py, encoders/modules.py, diffusionmodules/upscaling.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ldm.config import (AutoencoderConfig, ConfigError, DiffusionConfig, ModelConfig,
                        NoiseAugmentationConfig, TextEncoderConfig, UNetConfig, check_model_config,
                        parse_yaml)

# SD's make_beta_schedule names -> ours. SD's "linear" is linear in sqrt(beta).
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}

_IGNORED_LDM = {"base_learning_rate", "num_timesteps_cond", "log_every_t", "first_stage_key",
                "cond_stage_key", "image_size", "channels", "conditioning_key", "monitor",
                "use_ema", "scheduler_config", "ckpt_path", "ignore_keys", "load_only_unet",
                "loss_type", "scale_by_std", "cond_stage_forward", "concat_mode",
                "original_elbo_weight", "l_simple_weight", "v_posterior", "learn_logvar",
                "logvar_init", "use_positional_encodings", "clip_denoised", "make_it_fit",
                "reset_ema", "reset_num_ema_updates", "first_stage_trainable"}
_IGNORED_UNET = {"use_checkpoint", "use_fp16", "image_size", "legacy", "conv_resample",
                 "use_new_attention_order", "num_heads_upsample"}
_IGNORED_VAE = {"monitor", "lossconfig", "ckpt_path", "ignore_keys", "image_key",
                "colorize_nlabels"}
_IGNORED_TEXT = {"device", "freeze"}

# ddpm.py's model classes -> (our conditioning, the conditioning_key it is used with).
_TARGETS = {"LatentDiffusion": ("crossattn", "crossattn"),
            "LatentInpaintDiffusion": ("inpaint", "hybrid"),
            "LatentUpscaleDiffusion": ("upscale", "hybrid-adm")}
# Constructor keys of LatentFinetuneDiffusion/LatentInpaintDiffusion that only steer training
# (finetune_keys widens an older checkpoint's first conv when fine-tuning starts).
_IGNORED_INPAINT = {"finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end"}
_INPAINT_CONCAT_KEYS = ["mask", "masked_image"]  # the concat order the U-Net was trained with
_IGNORED_UPSCALE = {"low_scale_key"}


def is_sd_yaml(data: Any) -> bool:
    """True for SD's format: {model: {target: ..., params: ...}}."""
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "params" in data["model"]


def load_sd_yaml(path: str | Path) -> ModelConfig:
    """Read an SD inference YAML file; relative text-encoder configs resolve next to it."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not is_sd_yaml(data):
        raise ConfigError(f"{path}: not an SD inference config (needs model.target/model.params)")
    return translate_sd_yaml(data, base_dir=path.parent, where=path.name)


def _take(params: dict[str, Any], known: set[str], ignored: set[str], where: str) -> dict[str, Any]:
    unknown = sorted(set(params) - known - ignored)
    if unknown:
        raise ConfigError(f"{where}: unsupported key(s) {', '.join(unknown)}")
    return {k: params[k] for k in known if k in params}


def _expect(value: Any, allowed: tuple, key: str, where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}.{key}: {value!r} is not supported (only {allowed})")


def translate_sd_yaml(data: dict[str, Any], base_dir: Path = Path("."),
                      where: str = "sd config") -> ModelConfig:
    """ModelConfig from the parsed SD YAML mapping."""
    model = data["model"]
    target = str(model.get("target", ""))
    if target.rsplit(".", 1)[-1] not in _TARGETS:
        raise ConfigError(f"{where}: model.target {target!r} is not one of "
                          f"{', '.join(_TARGETS)} (ldm.models.diffusion.ddpm)")
    conditioning, key = _TARGETS[target.rsplit(".", 1)[-1]]
    p = dict(model["params"] or {})
    if p.get("conditioning_key", "crossattn") != key:
        raise ConfigError(f"{where}: conditioning_key {p.get('conditioning_key')!r} is not supported "
                          f"with {target.rsplit('.', 1)[-1]} (only {key!r})")
    extra_ignored: set[str] = set()
    noise_augmentation = None
    if conditioning == "inpaint":
        _inpaint_keys(p, where)
        extra_ignored = _IGNORED_INPAINT
    elif conditioning == "upscale":
        noise_augmentation = _upscale_keys(p, where)
        extra_ignored = _IGNORED_UPSCALE
    subs = {k: p.pop(k) for k in ("unet_config", "first_stage_config", "cond_stage_config")
            if k in p}
    missing = {"unet_config", "first_stage_config", "cond_stage_config"} - set(subs)
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(sorted(missing))}")
    known = {"linear_start", "linear_end", "timesteps", "beta_schedule", "cosine_s",
             "parameterization", "scale_factor", "cond_stage_trainable"}
    top = _take(p, known, _IGNORED_LDM | extra_ignored, f"{where}: model.params")
    schedule = top.get("beta_schedule", "linear")
    if schedule not in _BETA_SCHEDULES:
        raise ConfigError(f"{where}: beta_schedule {schedule!r} not supported "
                          f"(one of {sorted(_BETA_SCHEDULES)})")
    diffusion = DiffusionConfig(
        num_timesteps=top.get("timesteps", 1000), beta_schedule=_BETA_SCHEDULES[schedule],
        linear_start=float(top.get("linear_start", 1e-4)), linear_end=float(top.get("linear_end", 2e-2)),
        cosine_s=float(top.get("cosine_s", 8e-3)), prediction_type=top.get("parameterization", "eps"),
        scale_factor=float(top.get("scale_factor", 1.0)))
    _expect(diffusion.prediction_type, ("eps", "v", "x0"), "parameterization", where)
    config = ModelConfig(autoencoder=_autoencoder(subs["first_stage_config"], where),
                         unet=_unet(subs["unet_config"], where),
                         text_encoder=_text_encoder(subs["cond_stage_config"], base_dir, where,
                                                    bool(top.get("cond_stage_trainable", False))),
                         diffusion=diffusion, conditioning=conditioning,
                         noise_augmentation=noise_augmentation)
    try:
        check_model_config(config)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


def _inpaint_keys(p: dict[str, Any], where: str) -> None:
    """Check (and remove) LatentInpaintDiffusion's own keys that would change the inputs."""
    concat = list(p.pop("concat_keys", _INPAINT_CONCAT_KEYS))
    if concat != _INPAINT_CONCAT_KEYS:
        raise ConfigError(f"{where}: concat_keys {concat} not supported (only {_INPAINT_CONCAT_KEYS})")
    _expect(p.pop("masked_image_key", "masked_image"), ("masked_image",), "masked_image_key", where)


def _upscale_keys(p: dict[str, Any], where: str) -> NoiseAugmentationConfig:
    """LatentUpscaleDiffusion's low_scale_config (ImageConcatWithNoiseAugmentation) translated."""
    _expect(p.pop("noise_level_key", None), (None,), "noise_level_key", where)  # ddpm.py: TODO
    if "low_scale_config" not in p:
        raise ConfigError(f"{where}: LatentUpscaleDiffusion needs low_scale_config")
    cfg = p.pop("low_scale_config") or {}
    where = f"{where}: low_scale_config"
    if not str(cfg.get("target", "")).endswith("ImageConcatWithNoiseAugmentation"):
        raise ConfigError(f"{where}.target {cfg.get('target')!r} is not ImageConcatWithNoiseAugmentation")
    args = _take(dict(cfg.get("params") or {}), {"noise_schedule_config", "max_noise_level"},
                 {"to_cuda"}, where)
    if "noise_schedule_config" not in args:
        raise ConfigError(f"{where}: missing noise_schedule_config")
    sched = _take(dict(args["noise_schedule_config"] or {}),
                  {"beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s"}, set(),
                  f"{where}.noise_schedule_config")
    kind = sched.get("beta_schedule", "linear")  # AbstractLowScaleModel.register_schedule defaults
    if kind not in _BETA_SCHEDULES:
        raise ConfigError(f"{where}: beta_schedule {kind!r} not supported (one of {sorted(_BETA_SCHEDULES)})")
    return NoiseAugmentationConfig(
        num_timesteps=sched.get("timesteps", 1000), beta_schedule=_BETA_SCHEDULES[kind],
        linear_start=float(sched.get("linear_start", 1e-4)),
        linear_end=float(sched.get("linear_end", 2e-2)), cosine_s=float(sched.get("cosine_s", 8e-3)),
        max_noise_level=args.get("max_noise_level", 1000))


def _unet(cfg: dict[str, Any], where: str) -> UNetConfig:
    where = f"{where}: unet_config"
    if not str(cfg.get("target", "")).endswith("UNetModel"):
        raise ConfigError(f"{where}.target {cfg.get('target')!r} is not openaimodel.UNetModel")
    p = dict(cfg.get("params", {}))
    _expect(p.pop("use_spatial_transformer", False), (True,), "use_spatial_transformer", where)
    _expect(p.pop("dims", 2), (2,), "dims", where)
    _expect(p.pop("use_scale_shift_norm", False), (False,), "use_scale_shift_norm", where)
    _expect(p.pop("resblock_updown", False), (False,), "resblock_updown", where)
    num_classes = p.pop("num_classes", None)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise ConfigError(f"{where}.num_classes: only an integer is supported, got {num_classes!r}")
    _expect(p.pop("num_attention_blocks", None), (None,), "num_attention_blocks", where)
    _expect(p.pop("n_embed", None), (None,), "n_embed", where)
    known = {"in_channels", "out_channels", "model_channels", "attention_resolutions",
             "num_res_blocks", "channel_mult", "num_heads", "num_head_channels",
             "transformer_depth", "context_dim", "use_linear_in_transformer", "dropout",
             "disable_self_attentions", "disable_middle_self_attn"}
    args = _take(p, known, _IGNORED_UNET, where)
    args["num_classes"] = num_classes
    flags = args.get("disable_self_attentions")
    if flags is not None:
        if not isinstance(flags, (list, tuple)) or not all(isinstance(v, bool) for v in flags):
            raise ConfigError(f"{where}.disable_self_attentions: expected a list of true/false, "
                              f"got {flags!r}")
        args["disable_self_attentions"] = list(flags)
    if not isinstance(args.get("disable_middle_self_attn", False), bool):
        raise ConfigError(f"{where}.disable_middle_self_attn: expected true/false")
    args.setdefault("num_heads", -1)  # openaimodel's default
    args.setdefault("num_head_channels", -1)
    for key in ("channel_mult", "attention_resolutions"):
        if key in args:
            args[key] = list(args[key])
    if isinstance(args.get("num_res_blocks"), (list, tuple)):
        raise ConfigError(f"{where}.num_res_blocks: per-level lists are not supported")
    if isinstance(args.get("context_dim"), (list, tuple)):
        raise ConfigError(f"{where}.context_dim: per-block lists are not supported")
    if "dropout" in args:
        args["dropout"] = float(args["dropout"])
    return UNetConfig(**args)


def _autoencoder(cfg: dict[str, Any], where: str) -> AutoencoderConfig:
    where = f"{where}: first_stage_config"
    if not str(cfg.get("target", "")).endswith("AutoencoderKL"):
        raise ConfigError(f"{where}.target {cfg.get('target')!r} is not AutoencoderKL")
    p = dict(cfg.get("params", {}))
    dd = dict(p.pop("ddconfig", {}))
    top = _take(p, {"embed_dim"}, _IGNORED_VAE, where)
    _expect(dd.pop("attn_type", "vanilla"), ("vanilla", "vanilla-xformers"), "attn_type", where)
    known = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
             "num_res_blocks", "attn_resolutions", "dropout"}
    args = _take(dd, known, {"give_pre_end", "tanh_out", "resamp_with_conv", "use_linear_attn"},
                 f"{where}.ddconfig")
    for key in ("ch_mult", "attn_resolutions"):
        if key in args:
            args[key] = list(args[key])
    if "dropout" in args:
        args["dropout"] = float(args["dropout"])
    return AutoencoderConfig(embed_dim=top.get("embed_dim", 4), **args)


def _text_encoder(cfg: dict[str, Any], base_dir: Path, where: str,
                  trainable: bool) -> TextEncoderConfig:
    where = f"{where}: cond_stage_config"
    target = str(cfg.get("target", ""))
    p = dict(cfg.get("params") or {})
    if target.endswith("FrozenOpenCLIPEmbedder"):
        args = _take(p, {"arch", "version", "layer", "max_length"}, _IGNORED_TEXT, where)
        arch = args.get("arch", "ViT-H-14")
        return TextEncoderConfig(kind="open_clip", arch=arch, arch_config=_open_clip_arch(arch, base_dir, where),
                                 layer=args.get("layer", "last"), max_length=args.get("max_length", 77),
                                 trainable=trainable)
    if target.endswith("FrozenCLIPEmbedder"):
        args = _take(p, {"version", "layer", "max_length", "layer_idx"}, _IGNORED_TEXT, where)
        _expect(args.get("layer", "last"), ("last",), "layer", where)
        version = args.get("version", "openai/clip-vit-large-patch14")
        return TextEncoderConfig(kind="hf_clip", arch=version,
                                 arch_config=_hf_clip_arch(version, base_dir, where), layer="last",
                                 max_length=args.get("max_length", 77), trainable=trainable)
    raise ConfigError(f"{where}.target {target!r} is not FrozenOpenCLIPEmbedder or FrozenCLIPEmbedder")


def _open_clip_arch(arch: str, base_dir: Path, where: str) -> dict[str, Any] | None:
    """A `<arch>.json` beside the YAML (embedded), else None: a name in open_clip's registry."""
    local = base_dir / f"{arch}.json"
    if local.is_file():
        cfg = json.loads(local.read_text())
        return {k: v for k, v in cfg.items() if k != "vision_cfg"}  # we build the text tower only
    import open_clip
    if open_clip.get_model_config(arch) is None:
        raise ConfigError(f"{where}: open_clip architecture {arch!r} is unknown; put "
                          f"{arch}.json (an open_clip model config) beside the YAML")
    return None


def _hf_clip_arch(version: str, base_dir: Path, where: str) -> dict[str, Any] | None:
    """CLIPTextConfig fields from a local folder's config.json; None = CLIP ViT-L/14."""
    for folder in (base_dir / version, Path(version)):
        if (folder / "config.json").is_file():
            cfg = json.loads((folder / "config.json").read_text())
            return cfg.get("text_config", cfg)
    if version == "openai/clip-vit-large-patch14":
        return None
    raise ConfigError(f"{where}: text encoder {version!r} is neither openai/clip-vit-large-patch14 "
                      "nor a local folder with config.json (no downloads)")
