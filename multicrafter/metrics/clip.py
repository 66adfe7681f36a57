"""CLIP-T (image–prompt) and CLIP-I (image–reference) on transformers' CLIPModel.

Both are plain cosine similarities of L2-normalised CLIP embeddings, in [-1, 1] (≈0.2–0.35 for a matching prompt on
ViT-B/32), as in DreamBench and the paper's table. The default checkpoint is OpenAI's ViT-B/32, the one the
DreamBench line of papers reports; any CLIPModel hub id or local folder works (the aesthetic predictor uses ViT-L/14).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .defaults import DEFAULT_CLIP
from .loading import load_pretrained, read_json_config
from .preprocess import ImagePreprocess, clip_default, embed_in_batches, from_hf_config

__all__ = ["DEFAULT_CLIP", "ClipScorer", "mean_reference_similarity"]


def _features(out: object) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; older ones a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


class ClipScorer:
    """Embeds images and texts with one CLIP model; every score is a cosine similarity."""

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess, device: str | torch.device = "cpu",
                 batch_size: int = 16, source: str = "") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.source = source
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, source: str = DEFAULT_CLIP, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             batch_size: int = 16, option: str | None = "--clip-model", load_tokenizer: bool = True) -> ClipScorer:
        """Load by hub id or local folder; raises ModelUnavailable (one line) when the weights are not here."""
        from transformers import AutoTokenizer, CLIPModel  # seconds to import: only when a scorer is loaded

        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = load_pretrained(CLIPModel, source, "CLIP", option, **kwargs)
        tokenizer = load_pretrained(AutoTokenizer, source, "CLIP tokenizer", option) if load_tokenizer else None
        default = clip_default(int(model.config.vision_config.image_size))
        pre = from_hf_config(read_json_config(source, "preprocessor_config.json"), default)
        return cls(model, tokenizer, pre, device=device, batch_size=batch_size, source=str(source))

    @property
    def dim(self) -> int:
        """Width of the projected text and image embeddings."""
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit vectors on the CPU."""
        return embed_in_batches(images, self.preprocess, lambda px: _features(self.model.get_image_features(pixel_values=px)), self.model,
                                self.batch_size, self.device, self.dim)

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 unit vectors; prompts longer than CLIP's context are truncated, as every CLIP-T does."""
        if self.tokenizer is None:
            raise RuntimeError("this ClipScorer was loaded without a tokenizer")
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            out.append(_features(self.model.get_text_features(**tok)).float().cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Cosine(image_i, prompt_i) per pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1).tolist()

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Sequence[Image.Image]]) -> list[float]:
        """Mean over each image's references of cosine(whole image, reference); 0 for an image with no reference.

        For per-subject crops with one-to-one matching use `multicrafter.metrics.objects.subject_similarity`.
        """
        return mean_reference_similarity(self.image_embeddings, images, references)


def mean_reference_similarity(embed, images: Sequence[Image.Image],
                              references: Sequence[Sequence[Image.Image]]) -> list[float]:
    """Shared by CLIP-I and DINO-I: embed every image and reference once, average cosine per image."""
    if len(images) != len(references):
        raise ValueError(f"{len(images)} images but {len(references)} reference lists")
    flat = [r for refs in references for r in refs]
    img_emb = embed(list(images))
    ref_emb = embed(flat) if flat else None
    scores, k = [], 0
    for i, refs in enumerate(references):
        if not refs:
            scores.append(0.0)
            continue
        scores.append(float((ref_emb[k:k + len(refs)] @ img_emb[i]).mean()))
        k += len(refs)
    return scores
