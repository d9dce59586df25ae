"""Typed configuration: dataclasses are the truth, YAML mirrors them, unknown keys are errors.

YAML is read by `parse_yaml`, which also refuses a key repeated within one mapping.

`from_dict(cls, data)` builds a (nested) dataclass strictly; `to_dict` is its inverse (it is
what gets stored inside every checkpoint); `apply_overrides` takes `a.b=value` strings from
the command line. SD's original inference YAMLs are translated in `ldm.checkpoint`/`sd_yaml`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ldm.errors import LdmError

T = TypeVar("T")


class ConfigError(LdmError, ValueError):
    """A config that does not match its dataclass (unknown key, wrong type, bad value)."""


@dataclass
class AutoencoderConfig:
    """KL autoencoder (LDM's AutoencoderKL / SD's first stage)."""
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256
    double_z: bool = True
    dropout: float = 0.0


@dataclass
class UNetConfig:
    """Cross-attention U-Net (SD's openaimodel.UNetModel)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])  # downsample factors
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    dropout: float = 0.0
    num_classes: int | None = None          # label_emb rows (the x4 upscaler's noise level)
    disable_self_attentions: list[bool] | None = None  # per level: attn1 attends to the context
    disable_middle_self_attn: bool = False


@dataclass
class TextEncoderConfig:
    """Text tower: `open_clip` (SD 2.x, own models) or `hf_clip` (SD 1.x key layout)."""
    kind: str = "open_clip"
    arch: str = "ViT-H-14"                  # open_clip registry name (open_clip kind)
    arch_config: dict[str, Any] | None = None  # open_clip model cfg or HF CLIPTextConfig fields
    layer: str = "penultimate"              # "last" | "penultimate"
    max_length: int = 77
    trainable: bool = False
    weights: str | None = None              # local pretrained text-tower file for fresh models


@dataclass
class DiffusionConfig:
    """The forward process and what the network predicts (the U-Net never sees alphas)."""
    num_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"    # "linear" | "scaled_linear" | "cosine"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    cosine_s: float = 0.008
    zero_terminal_snr: bool = False
    prediction_type: str = "eps"            # "eps" | "v" | "x0"
    learned_variance: bool = False
    scale_factor: float = 0.18215           # latent scale (own VAEs: 1/std of first batch)
    # Timestep grid of the DDIM / DDPM / PLMS samplers: SD's "uniform", or "trailing" for
    # progressively distilled students (trained on that grid, ldm.train.distill).
    timestep_spacing: str = "uniform"
    # Classifier-free guidance scale trained into the network by distillation (0: none, the
    # sampler guides); such a model runs one conditional pass per step.
    distilled_guidance: float = 0.0


@dataclass
class NoiseAugmentationConfig:
    """The upscaler's low-res image noising (SD's ImageConcatWithNoiseAugmentation): its own
    forward process, applied in pixel space at a chosen noise level."""
    num_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"    # SD's "linear" (its register_schedule default)
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    max_noise_level: int = 350              # levels drawn in training are 0..max-1


# What the U-Net sees besides x_t, t and the text context (SD's conditioning_key):
#   crossattn: nothing else (LatentDiffusion).
#   inpaint:   input cat([x_t, mask (1), masked-image latent (embed_dim)]) (LatentInpaintDiffusion).
#   upscale:   input cat([x_t, noise-augmented low-res image in pixel space (3)]) and the noise
#              level as the class label y (LatentUpscaleDiffusion, hybrid-adm).
CONDITIONINGS = ("crossattn", "inpaint", "upscale")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a text-to-image model from a checkpoint alone."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    conditioning: str = "crossattn"         # one of CONDITIONINGS
    noise_augmentation: NoiseAugmentationConfig | None = None  # upscale only

    @property
    def concat_channels(self) -> int:
        """Channels concatenated to the latent x_t at the U-Net's input."""
        if self.conditioning == "inpaint":
            return 1 + self.autoencoder.embed_dim
        if self.conditioning == "upscale":
            return self.autoencoder.in_channels
        return 0


def check_model_config(config: ModelConfig) -> None:
    """Cross-field rules of a ModelConfig (conditioning vs. U-Net inputs); ConfigError if broken."""
    kind, unet = config.conditioning, config.unet
    if kind not in CONDITIONINGS:
        raise ConfigError(f"conditioning {kind!r} is unknown; allowed: {', '.join(CONDITIONINGS)}")
    expected = config.autoencoder.embed_dim + config.concat_channels
    if unet.in_channels != expected:
        extra = {"crossattn": "", "inpaint": " + mask 1 + masked-image latent "
                 f"{config.autoencoder.embed_dim}", "upscale": " + low-res image "
                 f"{config.autoencoder.in_channels}"}[kind]
        raise ConfigError(f"unet.in_channels {unet.in_channels} does not fit conditioning {kind!r}: "
                          f"expected {expected} (latent {config.autoencoder.embed_dim}{extra})")
    upscale = kind == "upscale"
    if upscale != (config.noise_augmentation is not None):
        raise ConfigError("noise_augmentation is required with conditioning 'upscale' and "
                          "allowed only there")
    if upscale != (unet.num_classes is not None):
        raise ConfigError("unet.num_classes (the noise-level embedding) is required with "
                          "conditioning 'upscale' and allowed only there")
    if upscale and config.noise_augmentation.max_noise_level > min(
            unet.num_classes, config.noise_augmentation.num_timesteps):
        raise ConfigError(f"noise_augmentation.max_noise_level {config.noise_augmentation.max_noise_level} "
                          f"exceeds unet.num_classes {unet.num_classes} or the augmentation's timesteps")
    flags = unet.disable_self_attentions
    if flags is not None and len(flags) != len(unet.channel_mult):
        raise ConfigError(f"unet.disable_self_attentions needs one entry per level "
                          f"({len(unet.channel_mult)}), got {len(flags)}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


# Keys accepted and dropped because configs stored in existing checkpoints hold them.
# unet.gradient_checkpointing: a training-time switch (run.gradient_checkpointing applies it to
# the modules); it changes neither weights nor outputs, so it has no place in a model config.
_RETIRED_KEYS: dict[type, frozenset[str]] = {UNetConfig: frozenset({"gradient_checkpointing"})}


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    retired = _RETIRED_KEYS.get(cls, frozenset())
    data = {k: v for k, v in data.items() if k not in retired}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-serialisable) of a dataclass config."""
    return dataclasses.asdict(config)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain PyYAML keeps the last value of a repeated key, so a stale or pasted line would
    silently replace a whole section of a config.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # unhashable key: the base class reports it
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Safe-load YAML text; raises yaml.YAMLError on a syntax error or a repeated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML mirror of `cls`, apply `a.b=value` overrides, validate strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, where=path.name)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict copy."""
    import copy
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
        node[parts[-1]] = parse_yaml(raw)
    return data
