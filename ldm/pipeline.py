"""Pipeline: the only object holding the autoencoder, U-Net and text encoder together."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.config import ConfigError, ModelConfig, check_model_config, load_yaml, parse_yaml
from ldm.errors import CheckpointError, LdmError


def resolve_config(config: ModelConfig | str | Path | None,
                   tensors: dict[str, Tensor] | None = None,
                   metadata: dict[str, str] | None = None) -> ModelConfig:
    """A ModelConfig from: itself, our YAML, an SD inference YAML, a preset name, the
    checkpoint's stored config, or (last resort) the SD family detected from its keys."""
    from ldm.presets import PRESETS
    from ldm.sd_yaml import is_sd_yaml, load_sd_yaml
    if isinstance(config, ModelConfig):
        return config
    if config is not None:
        path = Path(config)
        if not path.is_file():
            if str(config) in PRESETS:
                return PRESETS[str(config)]()
            raise ConfigError(f"config not found: {config} (a YAML file or one of {sorted(PRESETS)})")
        import yaml
        try:
            data = parse_yaml(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
            raise ConfigError(f"{path}: not a readable YAML file ({str(err).splitlines()[0]})") from None
        if is_sd_yaml(data):
            return load_sd_yaml(path)
        return _embed_arch_json(load_yaml(ModelConfig, path), path.parent)
    stored = ckpt.config_from_metadata(metadata or {})
    if stored is not None:
        return stored
    family = ckpt.detect_family(tensors or {})
    kind = ckpt.detect_conditioning(tensors or {})
    if family == "sd2" and kind == "upscale":
        return PRESETS["x4-upscaler"]()
    if family == "sd2" and kind == "inpaint":
        return PRESETS["sd2-inpainting"]()
    if family == "sd1":
        return PRESETS["sd1"]()
    if family == "sd2":
        warnings.warn("no config given: assuming SD 2.x with eps prediction "
                      "(for 768-v checkpoints pass config='configs/sd2-v.yaml')", stacklevel=3)
        return PRESETS["sd2"]()
    raise CheckpointError("the checkpoint stores no config and its keys are not SD 1.x/2.x; "
                          "pass config= (our YAML or the SD inference YAML)")


def _embed_arch_json(config: ModelConfig, base_dir: Path) -> ModelConfig:
    """An open_clip `arch` given as a model-config JSON file is read into arch_config, so
    checkpoints written from this config do not depend on that file."""
    text = config.text_encoder
    if text.kind == "open_clip" and text.arch_config is None and text.arch.endswith(".json"):
        file = next((p for p in (base_dir / text.arch, Path(text.arch)) if p.is_file()), None)
        if file is None:
            raise ConfigError(f"text_encoder.arch: {text.arch} not found (relative to {base_dir})")
        arch = json.loads(file.read_text())
        text.arch_config = {k: v for k, v in arch.items() if k != "vision_cfg"}
        text.arch = file.stem
    return config


def build_networks(config: ModelConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(autoencoder, unet, text_encoder) with fresh weights on the current default device."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.text_encoder import build_text_encoder, context_dim
    from ldm.models.unet import UNetModel
    width = context_dim(config.text_encoder)
    if width not in (-1, config.unet.context_dim):
        raise ConfigError(f"unet.context_dim {config.unet.context_dim} must equal the text "
                          f"encoder's width {width}")
    check_model_config(config)
    try:
        return AutoencoderKL(config.autoencoder), UNetModel(config.unet), build_text_encoder(config.text_encoder)
    except ValueError as err:
        raise ConfigError(f"invalid model config: {err}") from None


class Pipeline:
    """VAE + U-Net + text encoder + schedule + config, on one device and dtype."""

    def __init__(self, autoencoder: nn.Module, unet: nn.Module, text_encoder: nn.Module,
                 config: ModelConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from ldm.diffusion.noise_augmentation import make_noise_augmentation
        from ldm.diffusion.schedule import make_schedule
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        self.autoencoder = autoencoder.to(device=self.device, dtype=dtype)
        self.unet = unet.to(device=self.device, dtype=dtype)
        self.text_encoder = text_encoder.to(device=self.device, dtype=dtype)
        self.schedule = make_schedule(config.diffusion)
        # The upscaler's low-res noising (None for other models); see noise_low_res.
        self.noise_augmentation = (make_noise_augmentation(config.noise_augmentation)
                                   if config.noise_augmentation is not None else None)

    @classmethod
    def from_config(cls, config: ModelConfig | str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> "Pipeline":
        """Fresh random weights (deterministic in `seed`; the global RNG is left untouched)."""
        config = resolve_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            networks = build_networks(config)
        if config.text_encoder.weights:
            ckpt.load_text_encoder_weights(networks[2], config.text_encoder.weights)
        return cls(*networks, config=config, device=device, dtype=dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: ModelConfig | str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        use_ema: bool = False) -> "Pipeline":
        """Load strictly from a .safetensors/.ckpt (ours or SD's)."""
        tensors, metadata = ckpt.read_checkpoint(path)
        config = resolve_config(config, tensors, metadata)
        with torch.device("meta"):  # no random init: every tensor comes from the file
            autoencoder, unet, text_encoder = build_networks(config)
        weights = {"autoencoder": ckpt.part(tensors, "autoencoder"),
                   "unet": ckpt.ema_unet_weights(tensors, unet) if use_ema else ckpt.part(tensors, "unet"),
                   "text_encoder": ckpt.text_encoder_weights(tensors, text_encoder)}
        modules = {"autoencoder": autoencoder, "unet": unet, "text_encoder": text_encoder}
        problems = [p for name, module in modules.items()
                    for p in ckpt.mismatch_report(module, weights[name], ckpt.PREFIXES[name])]
        problems += _unexpected_top_level(tensors, config)
        if problems:
            raise CheckpointError(f"{path} does not match the config: {'; '.join(problems)}"
                                  f"{ckpt.family_hint(tensors, config)}"
                                  f"{ckpt.conditioning_hint(tensors, config)}")
        for name, module in modules.items():
            ckpt.load_strict(module, weights[name], name)
            ckpt.check_no_meta(module, name)
        if not config.text_encoder.trainable:
            text_encoder.requires_grad_(False)
        pipe = cls(autoencoder.eval(), unet.eval(), text_encoder.eval(), config, device, dtype)
        pipe.check_schedule_buffers(tensors, str(path))
        return pipe

    def check_schedule_buffers(self, tensors: dict[str, Tensor], where: str) -> None:
        """The checkpoint's schedule buffers (when present) must be those of config.diffusion,
        and the upscaler's low_scale_model.* buffers those of config.noise_augmentation."""
        from ldm.diffusion.noise_augmentation import low_scale_buffers
        from ldm.diffusion.schedule import sd_buffers
        expected = {name: (ours, "config.diffusion") for name, ours in
                    sd_buffers(self.schedule, torch.float64).items()}
        if self.noise_augmentation is not None:
            expected.update({ckpt.LOW_SCALE_PREFIX + name: (ours, "config.noise_augmentation")
                             for name, ours in low_scale_buffers(self.noise_augmentation,
                                                                 torch.float64).items()})
        for name, (ours, source) in expected.items():
            if name not in tensors:
                continue
            theirs = tensors[name].double()
            if theirs.shape != ours.shape or \
                    (theirs - ours).abs().max() > 1e-4 * ours.abs().max():
                raise CheckpointError(f"{where}: schedule buffer {name!r} differs from the one "
                                      f"{source} gives (timesteps/beta schedule mismatch)")

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> "Pipeline":
        """Move all three networks (in place) and return self."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for module in (self.autoencoder, self.unet, self.text_encoder):
            module.to(device=self.device, dtype=self.dtype)
        return self

    # ------------------------------------------------------------ the networks' faces

    def encode_prompt(self, prompts: list[str]) -> Tensor:
        """Prompts -> text context [B, 77, D] (truncates over-long prompts with a warning)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise LdmError("encode_prompt needs at least one prompt (use \"\" for unconditional)")
        return self.text_encoder.encode(list(prompts)).to(self.dtype)

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> posterior (mean, logvar) of unscaled latents."""
        factor = self.autoencoder.downsampling_factor
        if images.ndim != 4 or images.shape[1] != self.config.autoencoder.in_channels:
            raise LdmError(f"images must be [B, {self.config.autoencoder.in_channels}, H, W], "
                           f"got {list(images.shape)}")
        if images.shape[2] % factor or images.shape[3] % factor:
            raise LdmError(f"image size {images.shape[2]}x{images.shape[3]} must be a multiple of "
                           f"the autoencoder's factor {factor}")
        posterior = self.autoencoder.encode(images.to(self.device, self.dtype))
        return posterior.mean, posterior.logvar

    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents -> raw decoder output (divides by the scale factor; no clamping)."""
        z = z.to(self.device, self.dtype) / self.config.diffusion.scale_factor
        return self.autoencoder.decode(z)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the U-Net denoises (its input also holds config.concat_channels)."""
        return self.config.autoencoder.embed_dim

    @property
    def downsampling_factor(self) -> int:
        """Image size / latent size."""
        return self.autoencoder.downsampling_factor

    # ------------------------------------------------------------ saving

    def state_dict(self, ema_unet: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The full checkpoint dict in SD's layout, schedule buffers included."""
        from ldm.diffusion.noise_augmentation import low_scale_buffers
        from ldm.diffusion.schedule import sd_buffers
        low_scale = (low_scale_buffers(self.noise_augmentation)
                     if self.noise_augmentation is not None else None)
        return ckpt.collect_state_dict(self.autoencoder, self.unet, self.text_encoder,
                                       sd_buffers(self.schedule), ema_unet, low_scale)

    def save(self, path: str | Path, ema_unet: dict[str, Tensor] | None = None,
             metadata: dict[str, str] | None = None) -> None:
        """Atomic safetensors checkpoint carrying the config (rebuildable from the file alone)."""
        ckpt.write_checkpoint(path, self.state_dict(ema_unet),
                              {**(metadata or {}), **ckpt.config_metadata(self.config)})


def _unexpected_top_level(tensors: dict[str, Tensor], config: ModelConfig) -> list[str]:
    from ldm.diffusion.noise_augmentation import LOW_SCALE_BUFFER_NAMES
    from ldm.diffusion.schedule import SD_BUFFER_NAMES
    allowed = tuple(ckpt.PREFIXES.values()) + (ckpt.EMA_PREFIX,)
    buffers = set(SD_BUFFER_NAMES)
    if config.noise_augmentation is not None:  # LatentUpscaleDiffusion.low_scale_model
        buffers |= {ckpt.LOW_SCALE_PREFIX + name for name in LOW_SCALE_BUFFER_NAMES}
    extra = [k for k in tensors if not k.startswith(allowed) and k not in buffers]
    return [ckpt.format_keys("unexpected", extra)] if extra else []
