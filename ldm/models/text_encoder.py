"""Text encoders: OpenCLIP text tower (SD 2.x, own models) and HF-layout CLIP (SD 1.x).

Both share open_clip's CLIP BPE tokenizer and one interface: `tokenize(prompts) -> [B, L]`
token ids, `forward(tokens) -> [B, L, D]` context, `encode(prompts)` = both. Neither ever
downloads anything: architectures come from a config dict or open_clip's bundled registry.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config import ConfigError, TextEncoderConfig

# CLIP ViT-L/14 text model (openai/clip-vit-large-patch14), the SD 1.x text encoder.
CLIP_VIT_L14_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_LAYERS_FROM_END = {"last": 0, "penultimate": 1}


class PromptTokenizer:
    """CLIP BPE (open_clip's SimpleTokenizer): [sot] tokens [eot] then padding, truncated."""

    SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|> in CLIP's BPE vocabulary

    def __init__(self, context_length: int = 77, pad_with_eot: bool = False) -> None:
        self.context_length = context_length
        # open_clip pads with 0; HF's CLIPTokenizer (SD 1.x) pads with <|endoftext|>.
        self.pad_id = self.EOT if pad_with_eot else 0
        self._bpe = None  # loading the BPE vocabulary takes a while: only when first needed

    @property
    def bpe(self):  # noqa: ANN201 - open_clip's SimpleTokenizer
        """open_clip's SimpleTokenizer (bundled vocabulary; never downloads)."""
        if self._bpe is None:
            from open_clip.tokenizer import SimpleTokenizer
            self._bpe = SimpleTokenizer(context_length=self.context_length)
            assert (self._bpe.sot_token_id, self._bpe.eot_token_id) == (self.SOT, self.EOT)
        return self._bpe

    def __call__(self, prompts: list[str]) -> Tensor:
        """Token ids [B, context_length]; warns once per prompt that had to be truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        sot, eot, room = self.SOT, self.EOT, self.context_length - 2
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = self.bpe.encode(prompt)
            if len(ids) > room:
                warnings.warn(f"prompt {i} is too long: {len(ids) - room} of its {len(ids)} tokens "
                              f"were dropped (at most {room} fit in {self.context_length})",
                              stacklevel=3)
                ids = ids[:room]
            row = [sot, *ids, eot]
            out[i, :len(row)] = torch.tensor(row)
        return out


def _layer_index(layer: str) -> int:
    if layer not in _LAYERS_FROM_END:
        raise ConfigError(f"text_encoder.layer: {layer!r} is not one of {sorted(_LAYERS_FROM_END)}")
    return _LAYERS_FROM_END[layer]


class _TextEncoderBase(nn.Module):
    """Freezing and prompt encoding shared by both towers."""

    def _setup(self, config: TextEncoderConfig) -> None:
        self.config = config
        self.layers_from_end = _layer_index(config.layer)
        if not config.trainable:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "_TextEncoderBase":
        # A frozen encoder stays in eval mode whatever its parent does (SD's disabled_train).
        return super().train(mode and self.config.trainable)

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> context [B, L, D] on the encoder's device."""
        tokens = self.tokenize(prompts).to(next(self.parameters()).device)
        return self(tokens)


class _OpenClipText(nn.Module):
    """open_clip's CLIP without `visual`: the exact attribute names of SD 2.x's `model.*` keys."""

    def __init__(self, arch_config: dict[str, Any]) -> None:
        super().__init__()
        from open_clip.model import _build_text_tower
        text_cfg = dict(arch_config["text_cfg"])
        if "hf_model_name" in text_cfg or arch_config.get("custom_text"):
            raise ConfigError("text_encoder: only open_clip's built-in text transformer is supported")
        tower = _build_text_tower(arch_config["embed_dim"], text_cfg,
                                  quick_gelu=arch_config.get("quick_gelu", False))
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection  # unused for conditioning; kept for the keys
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1/0.07), as open_clip; unused


class OpenClipTextEncoder(_TextEncoderBase):
    """OpenCLIP text tower: token + position embeddings, causal transformer, ln_final."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        arch_config = config.arch_config
        if arch_config is None:
            import open_clip
            arch_config = open_clip.get_model_config(config.arch)
            if arch_config is None:
                raise ConfigError(f"text_encoder.arch: {config.arch!r} is not in open_clip's "
                                  "registry; give its model config as text_encoder.arch_config")
        positions = arch_config["text_cfg"].get("context_length", 77)
        if config.max_length > positions:
            raise ConfigError(f"text_encoder.max_length {config.max_length} exceeds the tower's "
                              f"context_length {positions}")
        self.model = _OpenClipText(arch_config)
        self.tokenizer = PromptTokenizer(config.max_length)
        self._setup(config)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Prompts -> token ids [B, L] (0-padded)."""
        return self.tokenizer(prompts)

    def forward(self, tokens: Tensor) -> Tensor:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding.to(m.token_embedding.weight.dtype)
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        blocks = m.transformer.resblocks
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        # SD 2.x runs all blocks but the last `layers_from_end`, then ln_final.
        for block in blocks[:len(blocks) - self.layers_from_end]:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return m.ln_final(x)


class _HFAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # CLIP's causal mask
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _HFMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"text_encoder.arch_config.hidden_act: {act!r} not supported")
        self.act = act
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class _HFLayer(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        dim, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-5)
        self.self_attn = _HFAttention(dim, c["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _HFMlp(dim, c["intermediate_size"], c.get("hidden_act", "quick_gelu"))
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _HFTextModel(nn.Module):
    """transformers' CLIPTextTransformer key layout: embeddings, encoder.layers, final_layer_norm."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        dim, positions = c["hidden_size"], c["max_position_embeddings"]
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(c["vocab_size"], dim)
        self.embeddings.position_embedding = nn.Embedding(positions, dim)
        # Persistent as in transformers < 4.31, which wrote the official SD 1.x checkpoints.
        self.embeddings.register_buffer("position_ids", torch.arange(positions)[None])
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_HFLayer(c) for _ in range(c["num_hidden_layers"]))
        self.final_layer_norm = nn.LayerNorm(dim, eps=c.get("layer_norm_eps", 1e-5))


class HFClipTextEncoder(_TextEncoderBase):
    """SD 1.x CLIP text encoder (keys `transformer.text_model.*`), written without transformers."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        arch = dict(CLIP_VIT_L14_TEXT if config.arch_config is None else config.arch_config)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "max_position_embeddings") if k not in arch]
        if missing:
            raise ConfigError(f"text_encoder.arch_config lacks {', '.join(missing)}")
        if config.max_length > arch["max_position_embeddings"]:
            raise ConfigError(f"text_encoder.max_length {config.max_length} exceeds "
                              f"max_position_embeddings {arch['max_position_embeddings']}")
        self.transformer = nn.Module()
        self.transformer.text_model = _HFTextModel(arch)
        self.tokenizer = PromptTokenizer(config.max_length, pad_with_eot=True)
        self._setup(config)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Prompts -> token ids [B, L] (padded with <|endoftext|>, as HF's CLIPTokenizer)."""
        return self.tokenizer(prompts)

    def forward(self, tokens: Tensor) -> Tensor:
        m = self.transformer.text_model
        positions = m.embeddings.position_ids[:, :tokens.shape[1]]
        x = m.embeddings.token_embedding(tokens) + m.embeddings.position_embedding(positions)
        layers = m.encoder.layers
        for layer in layers[:len(layers) - self.layers_from_end]:
            x = layer(x)
        # "last" is HF's last_hidden_state; "penultimate" also gets the final norm ("clip skip").
        return m.final_layer_norm(x)


def build_text_encoder(config: TextEncoderConfig) -> nn.Module:
    """The text encoder named by `config.kind` ("open_clip" or "hf_clip")."""
    if config.kind == "open_clip":
        return OpenClipTextEncoder(config)
    if config.kind == "hf_clip":
        return HFClipTextEncoder(config)
    raise ConfigError(f"text_encoder.kind: {config.kind!r} is not one of 'open_clip', 'hf_clip'")


def context_dim(config: TextEncoderConfig) -> int:
    """Width D of the context this encoder produces (what the U-Net's context_dim must be)."""
    if config.kind == "hf_clip":
        return (config.arch_config or CLIP_VIT_L14_TEXT)["hidden_size"]
    arch = config.arch_config
    if arch is None:
        import open_clip
        arch = open_clip.get_model_config(config.arch) or {}
    return arch.get("text_cfg", {}).get("width", -1)
