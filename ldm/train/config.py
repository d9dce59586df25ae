"""Training settings: dataclasses mirrored by `configs/train_*.yaml` (strict, like ldm.config).

A training YAML is a model config plus these sections; `key.sub=value` strings from the
command line override it (`ldm.config.apply_overrides`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm.config import AutoencoderConfig, ConfigError, ModelConfig


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then constant or cosine decay."""
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay: str = "constant"          # "constant" | "cosine"
    min_lr_ratio: float = 0.0        # cosine floor as a fraction of lr
    grad_clip: float = 1.0           # max global grad norm; 0 disables


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (used for export and samples)."""
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True              # LDM's LitEma: decay = min(decay, (1+n)/(10+n))
    start_step: int = 0
    every: int = 1                   # update every N steps (decay**N): cheaper for big embeddings


@dataclass
class DataConfig:
    """Where images and captions come from and how they are cropped."""
    kind: str = "folder"             # "folder" | "webdataset"
    path: str = ""                   # folder, or tar shards ("dir/", "a-{000..009}.tar")
    size: int = 64
    crop: str = "center"             # "center" | "random"
    flip: bool = False               # random horizontal flip
    require_captions: bool = True
    in_memory: bool = True           # decode the folder once (small data sets, fast on CPU)
    num_workers: int = 0             # DataLoader workers (0: load in the training process)


@dataclass
class RunConfig:
    """Loop settings shared by both stages."""
    seed: int = 0
    steps: int = 1000                # optimizer steps
    batch_size: int = 8              # global micro-batch, split evenly across ranks
    grad_accum: int = 1
    precision: str = "fp32"          # "fp32" | "bf16" (autocast, CPU/CUDA) | "fp16" (CUDA only)
    gradient_checkpointing: bool = False
    channels_last: bool = False
    device: str = "auto"             # "auto" | "cpu" | "cuda"
    threads: int = 0                 # torch.set_num_threads; 0 leaves torch's default
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    image_every: int = 500           # reconstruction / sample grids; 0 disables
    progress: bool = True            # tqdm bar


@dataclass
class VAELossConfig:
    """Stage-1 loss (LDM's LPIPSWithDiscriminator): NLL with learned logvar, KL, LPIPS, GAN."""
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    logvar_init: float = 0.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0   # >0 needs local LPIPS weights (never downloaded)
    lpips_vgg_path: str = ""         # torchvision vgg16 weights; "" looks in the torch hub cache
    lpips_lin_path: str = ""         # LPIPS v0.1 linear-layer weights (vgg.pth)
    disc_start: int = -1             # step at which the discriminator starts; <0 disables it
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float = 0.0             # 0: same as optim.lr


@dataclass
class VAETrainConfig:
    """Stage 1: an autoencoder on images."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # LDM's autoencoder uses Adam with betas (0.5, 0.9) and no weight decay
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(betas=[0.5, 0.9], weight_decay=0.0))
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    data: DataConfig = field(default_factory=DataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)


@dataclass
class LDMStageConfig:
    """Stage-2 specifics: the frozen VAE, targets, loss weighting, conditioning dropout."""
    vae: str = ""                    # stage-1 file (train_vae.py output) or an SD checkpoint
    scale_by_std: bool = True        # scale factor = 1/std of the first batch's latents
    caption_dropout: float = 0.1     # replace captions by "" (classifier-free guidance)
    min_snr_gamma: float = 0.0       # Min-SNR-gamma weighting; 0 disables
    noise_offset: float = 0.0
    vlb_weight: float = 0.001        # lambda of L_hybrid when diffusion.learned_variance
    cache_latents: bool = False      # encode the data set once, train on the cached moments
    sample_prompts: list[str] = field(default_factory=list)
    samples_per_prompt: int = 4
    sample_steps: int = 30
    guidance_scale: float = 4.0


@dataclass
class LDMTrainConfig:
    """Stage 2: a text-conditioned U-Net on the frozen VAE's latents."""
    model: ModelConfig = field(default_factory=ModelConfig)  # .autoencoder comes from ldm.vae
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ldm: LDMStageConfig = field(default_factory=LDMStageConfig)


_CHOICES = {
    "optim.decay": ("constant", "cosine"),
    "data.kind": ("folder", "webdataset"),
    "data.crop": ("center", "random"),
    "run.precision": ("fp32", "bf16", "fp16"),
    "run.device": ("auto", "cpu", "cuda"),
}


def validate(config: VAETrainConfig | LDMTrainConfig) -> None:
    """Check value ranges the type system cannot express; raise ConfigError naming the key."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; use one of {', '.join(allowed)}")
    run = config.run
    for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "keep_checkpoints"):
        if getattr(run, key) < 1:
            raise ConfigError(f"run.{key} must be >= 1, got {getattr(run, key)}")
    if config.ema.every < 1:
        raise ConfigError(f"ema.every must be >= 1, got {config.ema.every}")
    if not 0.0 <= config.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1), got {config.ema.decay}")
    if config.data.size < 8:
        raise ConfigError(f"data.size must be >= 8, got {config.data.size}")
    if isinstance(config, VAETrainConfig):
        # The encoder halves each side per level (rounding down after an odd side), so only
        # multiples of the factor decode back to the input size the loss compares against.
        factor = 2 ** (len(config.autoencoder.ch_mult) - 1)
        if config.data.size % factor:
            raise ConfigError(f"data.size {config.data.size} must be a multiple of the autoencoder's "
                              f"factor {factor} (2 ** (len(autoencoder.ch_mult) - 1))")
    if isinstance(config, VAETrainConfig) and config.loss.disc_start >= 0:
        if config.data.size // 2 ** config.loss.disc_layers < 3:
            raise ConfigError(f"data.size {config.data.size} is too small for a {config.loss.disc_layers}-layer "
                              "discriminator; lower loss.disc_layers")
    if isinstance(config, LDMTrainConfig):
        if not 0.0 <= config.ldm.caption_dropout <= 1.0:
            raise ConfigError(f"ldm.caption_dropout must be in [0, 1], got {config.ldm.caption_dropout}")
        if not config.ldm.vae:
            raise ConfigError("ldm.vae is empty; give the stage-1 file (ldm.vae=path/to/vae.safetensors)")
