"""CLIP score (Hessel et al. 2021) of images against their prompts with an OpenCLIP model.

Reported as 100 * mean(max(cos(image, text), 0)), the scaling most text-to-image papers and
torchmetrics use (Hessel et al.'s CLIPScore uses the weight 2.5 instead of 100). The model and
its weights come from local files through open_clip's own loader; nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.eval.errors import EvalError


class ClipScorer:
    """Cosine similarities of OpenCLIP image and text embeddings."""

    def __init__(self, arch: str, weights: str | Path, batch_size: int = 32) -> None:
        import open_clip

        weights = Path(weights)
        if not weights.is_file():
            raise EvalError(f"CLIP weights not found: {weights} (--clip-weights takes an OpenCLIP "
                            f"checkpoint file for --clip-model {arch})")
        if arch.endswith(".json"):  # a model config file: registered under its file stem
            if not Path(arch).is_file():
                raise EvalError(f"CLIP model config not found: {arch}")
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        if arch not in open_clip.list_models():
            raise EvalError(f"unknown OpenCLIP model {arch!r} (a name from open_clip.list_models() "
                            f"or a model config .json)")
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(weights), require_pretrained=True)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is one user-facing error
            raise EvalError(f"cannot load CLIP weights {weights} for {arch}: {str(err).splitlines()[0]}") from None
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.batch_size = batch_size

    @torch.inference_mode()
    def similarities(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        """cos(image_i, prompt_i) for each pair: [N]."""
        if len(images) != len(prompts):
            raise EvalError(f"CLIP score needs one prompt per image, got {len(images)} images "
                            f"and {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(im))
                                  for im in images[start:start + self.batch_size]])
            tokens = self.tokenizer(prompts[start:start + self.batch_size])
            image_emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            text_emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            out.append((image_emb * text_emb).sum(-1).double().numpy())
        return np.concatenate(out)

    def score(self, images: list[np.ndarray], prompts: list[str]) -> float:
        """100 * mean of max(cos, 0) over image-prompt pairs."""
        return float(100.0 * np.clip(self.similarities(images, prompts), 0.0, None).mean())
