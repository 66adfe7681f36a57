"""DINO-I: cosine similarity of self-supervised ViT CLS embeddings between a generated image and its references.

DreamBench uses DINO ViT-S/16 (`facebook/dino-vits16`, the default here); DINOv2 checkpoints (`facebook/dinov2-*`)
are selectable by id or folder. The embedding is the CLS token of the last (layer-normalised) hidden state, the same
vector for both families, so scores are cosines in [-1, 1] (≈0.3–0.8 for the same object).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .clip import mean_reference_similarity
from .defaults import DEFAULT_DINO, DINOV2
from .loading import load_pretrained, read_json_config
from .preprocess import ImagePreprocess, dino_default, embed_in_batches, from_hf_config

__all__ = ["DEFAULT_DINO", "DINOV2", "DinoScorer"]


class DinoScorer:
    """Embeds images with a DINO (ViT) or DINOv2 backbone; every score is a cosine similarity."""

    def __init__(self, model, preprocess: ImagePreprocess, device: str | torch.device = "cpu", batch_size: int = 16,
                 source: str = "") -> None:
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.source = source

    @classmethod
    def load(cls, source: str = DEFAULT_DINO, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             batch_size: int = 16, option: str | None = "--dino-model") -> DinoScorer:
        """Load by hub id or local folder (ViT or DINOv2); raises ModelUnavailable (one line) when not here."""
        from transformers import AutoConfig, AutoModel, ViTModel  # seconds to import: only when a scorer is loaded

        config = load_pretrained(AutoConfig, source, "DINO", option)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if config.model_type == "vit":  # no pooler: DINO checkpoints have none and DINO-I uses the CLS token
            model = load_pretrained(ViTModel, source, "DINO", option, add_pooling_layer=False, **kwargs)
        else:
            model = load_pretrained(AutoModel, source, "DINO", option, **kwargs)
        size = int(config.image_size)
        if config.model_type == "dinov2":  # DINOv2 is trained at 518 but evaluated (and served) at 224
            size = min(size, 224)
        pre = from_hf_config(read_json_config(source, "preprocessor_config.json"), dino_default(size))
        return cls(model, pre, device=device, batch_size=batch_size, source=str(source))

    @property
    def dim(self) -> int:
        """Width of the CLS-token image embedding."""
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit CLS vectors on the CPU."""
        return embed_in_batches(images, self.preprocess, lambda px: self.model(pixel_values=px).last_hidden_state[:, 0], self.model,
                                self.batch_size, self.device, self.dim)

    def dino_i(self, images: Sequence[Image.Image], references: Sequence[Sequence[Image.Image]]) -> list[float]:
        """Mean over each image's references of cosine(whole image, reference); 0 for an image with no reference."""
        return mean_reference_similarity(self.image_embeddings, images, references)
