"""THE state-dict layout: reading/writing checkpoints and the SD key map.

A full checkpoint is SD's LatentDiffusion state dict: each network under its prefix below,
the 12 schedule buffers at the top level, optional EMA weights of the U-Net as
`model_ema.<key without dots>` (LitEma's naming), and for the x4 upscaler the 8 buffers of
its noise augmentation under `low_scale_model.` (LatentUpscaleDiffusion.low_scale_model).
Our files are safetensors with the ModelConfig as JSON in the metadata key "ldm_config", so a
checkpoint rebuilds its model.
Reading never executes code: safetensors, or torch.load(weights_only=True).

A file may store only its U-Net and name, in the metadata key "ldm_base", the file beside it
that holds its VAE and text encoder (a distilled student shares both with its teacher), with
that file's SHA-256 in "ldm_base_sha256"; reading completes it from there, so every reader sees
a full checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.config import AutoencoderConfig, ConfigError, ModelConfig, from_dict, to_dict
from ldm.errors import CheckpointError

# The prefix table (SD's attribute names; ours are autoencoder / unet / text_encoder).
PREFIXES = {
    "autoencoder": "first_stage_model.",
    "unet": "model.diffusion_model.",
    "text_encoder": "cond_stage_model.",
}
EMA_PREFIX = "model_ema."
LOW_SCALE_PREFIX = "low_scale_model."
FIRST_CONV = "input_blocks.0.0.weight"  # U-Net key whose in-channels tell the conditioning
EMA_UNET_ROOT = "diffusion_model."  # LitEma names start from LatentDiffusion.model
CONFIG_METADATA_KEY = "ldm_config"
BASE_METADATA_KEY = "ldm_base"          # file name (same folder) holding the shared networks
BASE_SHA_METADATA_KEY = "ldm_base_sha256"
SHARED_PARTS = ("autoencoder", "text_encoder")  # what a file completed from a base leaves out
_SHOW = 5  # keys listed per kind of mismatch


def ema_key(unet_key: str) -> str:
    """Checkpoint key of the EMA copy of U-Net parameter `unet_key` (no prefix)."""
    return EMA_PREFIX + (EMA_UNET_ROOT + unet_key).replace(".", "")


# ---------------------------------------------------------------- files


def read_checkpoint(path: str | Path, complete: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a .safetensors or .ckpt/.pt file (never runs code); a
    file naming a base is completed from it (complete=False: the file's own tensors only)."""
    tensors, metadata = _read_file(Path(path))
    if complete and BASE_METADATA_KEY in metadata:
        tensors = {**base_parts(Path(path), metadata), **tensors}
    return tensors, metadata


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_parts(path: Path, metadata: dict[str, str]) -> dict[str, Tensor]:
    """The shared networks' tensors from the base file that `path`'s metadata names, after
    checking its SHA-256 (a retrained base must not silently pair with an old U-Net)."""
    name = metadata[BASE_METADATA_KEY]
    base = path.parent / name
    if Path(name).name != name or not base.is_file():
        raise CheckpointError(f"{path} stores only its U-Net; its VAE and text encoder come from "
                              f"{name!r}, which is not a file beside it")
    want, got = metadata.get(BASE_SHA_METADATA_KEY, ""), file_sha256(base)
    if got != want:
        raise CheckpointError(f"{path} was made to complete {name} with SHA-256 {want[:12]}..., "
                              f"but the {name} beside it has {got[:12]}...")
    tensors, _ = _read_file(base)
    prefixes = tuple(PREFIXES[p] for p in SHARED_PARTS)
    return {k: v for k, v in tensors.items() if k.startswith(prefixes)}


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header's "{". Checked
    # first: a header length of 128 mod 256 starts with the byte 0x80 of a legacy pickle.
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):  # torch zip / pickle
        return _read_torch(path), {}
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError has no stable import path across versions
        raise CheckpointError(f"cannot read checkpoint {path}: not a complete safetensors or "
                              f"torch file ({str(err).splitlines()[0][:120]})") from None
    return tensors, metadata


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+(?: [\w.]+)?)", str(err))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: unpickling it would run code{what}; only plain tensor "
            "checkpoints are accepted (convert it to .safetensors with a tool you trust)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: file is truncated or corrupt "
                              f"({str(err).splitlines()[0][:120]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style {"state_dict": ..., "global_step": ...}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_checkpoint(path: str | Path, tensors: dict[str, Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then os.replace)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():  # safetensors refuses tensors that share memory
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise CheckpointError(f"checkpoint metadata values must be strings: {bad}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(out, tmp, metadata=dict(metadata or {}))
        # safetensors writes 0600 files; a checkpoint gets what the umask gives any new file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- config in metadata


def config_metadata(config: ModelConfig | AutoencoderConfig) -> dict[str, str]:
    """Metadata entry storing a config (a stage-1 file stores {"autoencoder": ...} only)."""
    data = {"autoencoder": to_dict(config)} if isinstance(config, AutoencoderConfig) else to_dict(config)
    return {CONFIG_METADATA_KEY: json.dumps(data, sort_keys=True)}


def _config_json(metadata: dict[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint metadata {CONFIG_METADATA_KEY!r} is not JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint metadata {CONFIG_METADATA_KEY!r} is not a mapping")
    return data


def config_from_metadata(metadata: dict[str, str]) -> ModelConfig | None:
    """The ModelConfig stored in a full checkpoint, or None."""
    data = _config_json(metadata)
    if data is None or set(data) == {"autoencoder"}:
        return None
    return from_dict(ModelConfig, data, where="checkpoint ldm_config")


# ---------------------------------------------------------------- layout


def detect_family(tensors: dict[str, Tensor]) -> str | None:
    """'sd1' (HF CLIP text encoder keys), 'sd2' (OpenCLIP keys) or None."""
    if any(k.startswith("cond_stage_model.transformer.") for k in tensors):
        return "sd1"
    if any(k.startswith("cond_stage_model.model.") for k in tensors):
        return "sd2"
    return None


def family_hint(tensors: dict[str, Tensor], config: ModelConfig | None) -> str:
    """A hint naming the right config when the checkpoint's family differs from the config's."""
    family = detect_family(tensors)
    ours = None if config is None else {"hf_clip": "sd1", "open_clip": "sd2"}.get(config.text_encoder.kind)
    if family and family != ours:
        name = {"sd1": "SD 1.x", "sd2": "SD 2.x"}[family]
        return f"; this looks like an {name} checkpoint: use an {name} config (configs/{family}.yaml)"
    return ""


def detect_conditioning(tensors: dict[str, Tensor]) -> str | None:
    """'upscale', 'inpaint' or 'crossattn' from the U-Net's keys (None without a U-Net)."""
    if any(k.startswith(LOW_SCALE_PREFIX) for k in tensors) or \
            PREFIXES["unet"] + "label_emb.weight" in tensors:
        return "upscale"
    first, out = tensors.get(PREFIXES["unet"] + FIRST_CONV), tensors.get(PREFIXES["unet"] + "out.2.weight")
    if first is None or out is None or first.ndim != 4 or out.ndim != 4:
        return None
    # inpainting: latent + mask (1) + masked-image latent, both latents as wide as the output
    return "inpaint" if first.shape[1] == 1 + 2 * out.shape[0] else "crossattn"


# (kind of model, the config to use for an SD 1.x checkpoint, for an SD 2.x one)
_CONDITIONING_NAMES = {
    "crossattn": ("a text-to-image", "configs/sd1.yaml", "configs/sd2.yaml or configs/sd2-v.yaml"),
    "inpaint": ("an inpainting", "its v1-inpainting-inference.yaml", "configs/sd2-inpainting.yaml"),
    "upscale": ("an x4 upscaler", "configs/x4-upscaler.yaml", "configs/x4-upscaler.yaml")}


def conditioning_hint(tensors: dict[str, Tensor], config: ModelConfig | None) -> str:
    """A hint naming the U-Net's input channels when checkpoint and config are different kinds
    of model (inpainting, upscaler, text-to-image)."""
    found = detect_conditioning(tensors)
    if config is None or found is None or found == config.conditioning:
        return ""
    first = tensors.get(PREFIXES["unet"] + FIRST_CONV)
    channels = first.shape[1] if first is not None and first.ndim == 4 else "?"
    what, sd1_config, sd2_config = _CONDITIONING_NAMES[found]
    use = sd1_config if detect_family(tensors) == "sd1" else sd2_config
    return (f"; the checkpoint's U-Net takes {channels} input channels, the config's "
            f"{config.unet.in_channels} (conditioning {config.conditioning!r}): this is {what} "
            f"checkpoint, use {what} config ({use})")


def collect_state_dict(autoencoder: nn.Module | None = None, unet: nn.Module | None = None,
                       text_encoder: nn.Module | None = None,
                       schedule_buffers: dict[str, Tensor] | None = None,
                       ema_unet: dict[str, Tensor] | None = None,
                       low_scale_buffers: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The full checkpoint dict in SD's layout from whichever parts are given."""
    out: dict[str, Tensor] = {}
    for name, module in (("autoencoder", autoencoder), ("unet", unet), ("text_encoder", text_encoder)):
        if module is not None:
            out.update({PREFIXES[name] + k: v for k, v in module.state_dict().items()})
    out.update(schedule_buffers or {})
    out.update({LOW_SCALE_PREFIX + k: v for k, v in (low_scale_buffers or {}).items()})
    out.update({ema_key(k): v for k, v in (ema_unet or {}).items()})
    return out


def part(tensors: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The sub-dict of one network ('autoencoder', 'unet', 'text_encoder'), prefix removed."""
    prefix = PREFIXES[name]
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


HF_POSITION_IDS = "transformer.text_model.embeddings.position_ids"


def text_encoder_weights(tensors: dict[str, Tensor], text_encoder: nn.Module) -> dict[str, Tensor]:
    """The text encoder's sub-dict, tolerating what SD 1.x files in the wild differ by."""
    weights = part(tensors, "text_encoder")
    expected = text_encoder.state_dict()
    if HF_POSITION_IDS not in expected:
        return weights
    # transformers < 4.? had no `text_model.` level: transformer.embeddings.* etc.
    old = ("transformer.embeddings.", "transformer.encoder.", "transformer.final_layer_norm.")
    weights = {("transformer.text_model." + k[len("transformer."):] if k.startswith(old) else k): v
               for k, v in weights.items()}
    ids = weights.get(HF_POSITION_IDS)
    if ids is None:  # transformers >= 4.31 stopped saving this constant buffer
        weights[HF_POSITION_IDS] = torch.arange(expected[HF_POSITION_IDS].shape[-1])[None]
    elif ids.is_floating_point():  # some merged checkpoints hold it as (inexact) floats
        weights[HF_POSITION_IDS] = ids.round().long()
    return weights


def ema_unet_weights(tensors: dict[str, Tensor], unet: nn.Module) -> dict[str, Tensor]:
    """The U-Net state dict with parameters replaced by their EMA copies."""
    if not any(k.startswith(EMA_PREFIX) for k in tensors):
        raise CheckpointError("use_ema was requested but the checkpoint holds no EMA weights "
                              f"({EMA_PREFIX}* keys)")
    out = part(tensors, "unet")
    missing = []
    for name, _ in unet.named_parameters():
        key = ema_key(name)
        if key in tensors:
            out[name] = tensors[key]
        else:
            missing.append(key)
    if missing:
        raise CheckpointError(f"EMA weights incomplete: {len(missing)} missing, e.g. "
                              f"{', '.join(missing[:_SHOW])}")
    return out


def mismatch_report(module: nn.Module, tensors: dict[str, Tensor], prefix: str = "") -> list[str]:
    """Human-readable missing / unexpected / mis-shaped key lists (empty when they match)."""
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in tensors]
    unexpected = [prefix + k for k in tensors if k not in expected]
    shapes = [f"{prefix}{k} {list(v.shape)} (model wants {list(expected[k].shape)})"
              for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    return [format_keys(label, items) for label, items in
            (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if items]


def format_keys(label: str, items: list[str]) -> str:
    """Error-message listing: count, the first few keys, how many more."""
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {label} key(s): {', '.join(items[:_SHOW])}{more}"


def load_strict(module: nn.Module, tensors: dict[str, Tensor], what: str, hint: str = "") -> None:
    """load_state_dict(assign=True) after checking keys and shapes; one clear error otherwise."""
    problems = mismatch_report(module, tensors)
    if problems:
        raise CheckpointError(f"{what} does not match the config: {'; '.join(problems)}{hint}")
    module.load_state_dict(tensors, strict=True, assign=True)


def check_no_meta(module: nn.Module, what: str) -> None:
    """Fail if any tensor was left unloaded on the meta device."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: {format_keys('unloaded', left)}")


# ---------------------------------------------------------------- pretrained text towers

# Keys of the other tower / heads in full CLIP files (open_clip and HF): not ours to load.
_OTHER_CLIP_PARTS = ("visual.", "vision_model.", "visual_projection", "logit_bias")


def load_text_encoder_weights(text_encoder: nn.Module, path: str | Path) -> None:
    """Load a local pretrained text tower: an open_clip CLIP file (open_clip kind), an HF
    CLIP(Text)Model file (hf_clip kind), or one of our / SD's checkpoints. Strict on its keys."""
    tensors, _ = read_checkpoint(path)
    ours = text_encoder.state_dict()
    if HF_POSITION_IDS in ours:  # HF layout: text_model.* of a CLIPTextModel or CLIPModel
        bare = {"transformer." + k: v for k, v in tensors.items() if k.startswith("text_model.")}
    else:  # open_clip layout: a whole CLIP state dict minus the image tower
        bare = {"model." + k: v for k, v in tensors.items() if not k.startswith(_OTHER_CLIP_PARTS)}
    candidates = [part(tensors, "text_encoder"), bare]
    found = max(candidates, key=lambda c: sum(k in ours for k in c))
    if HF_POSITION_IDS in ours:
        found.setdefault(HF_POSITION_IDS, torch.arange(ours[HF_POSITION_IDS].shape[-1])[None])
        found = {k: v for k, v in found.items() if k in ours}  # drop CLIP-head extras
    load_strict(text_encoder, found, f"text encoder weights {path}")


# ---------------------------------------------------------------- stage-1 autoencoder


def load_autoencoder(path: str | Path, config: AutoencoderConfig | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     ) -> tuple[nn.Module, AutoencoderConfig, dict[str, str]]:
    """AutoencoderKL from a stage-1 file, a full checkpoint or a bare SD VAE file."""
    from ldm.models.autoencoder import AutoencoderKL
    tensors, metadata = read_checkpoint(path)
    if config is None:
        data = _config_json(metadata)
        if data is not None and "autoencoder" in data:
            config = from_dict(AutoencoderConfig, data["autoencoder"], where="checkpoint ldm_config.autoencoder")
        else:
            config = AutoencoderConfig()  # SD's VAE (f=8, 4 latent channels)
    weights = part(tensors, "autoencoder")
    if not weights:  # bare VAE files (e.g. SD's vae-ft-*.ckpt) have no prefix
        weights = {k: v for k, v in tensors.items() if k.split(".")[0] in
                   ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    if not weights:
        raise CheckpointError(f"{path}: no autoencoder weights ({PREFIXES['autoencoder']}* keys)")
    try:
        with torch.device("meta"):
            model = AutoencoderKL(config)
    except (ValueError, ConfigError) as err:
        raise CheckpointError(f"{path}: bad autoencoder config ({err})") from None
    load_strict(model, weights, f"autoencoder in {path}")
    check_no_meta(model, str(path))
    return model.to(device=device, dtype=dtype).eval(), config, metadata
