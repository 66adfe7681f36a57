"""SAM 2 through transformers' `Sam2Model`, with hand-written preprocessing (Sam2ImageProcessor imports torchvision).

Preprocessing matches SAM 2: resize to the model's square input (1024 for the released checkpoints), ImageNet
normalisation, prompt coordinates scaled by the same factors. The image embedding is cached per image, so each new
click costs only the prompt encoder and mask decoder.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multicrafter.metrics.loading import ModelUnavailable, load_pretrained  # one loading rule for every model

DEFAULT_SAM2 = "facebook/sam2.1-hiera-tiny"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


SAM2_OPTION = ("MULTICRAFTER_SAM2", "--sam2")  # how a local copy is passed (the app's variable, the CLIs' flag)

__all__ = ["DEFAULT_SAM2", "IMAGENET_MEAN", "IMAGENET_STD", "SAM2_OPTION", "Sam2Predictor", "Sam2Unavailable",
           "image_key", "load_sam2", "preprocess"]


class Sam2Unavailable(ModelUnavailable):
    """No SAM 2 weights could be loaded (offline and not cached, a failed download, or a bad folder)."""


def load_sam2(name_or_path: str | os.PathLike = DEFAULT_SAM2, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A `Sam2Model` from a hub id (facebook/sam2.1-hiera-tiny|small|base-plus|large; downloaded on first use unless
    HF_HUB_OFFLINE=1) or a local folder; Sam2Unavailable (one line) when it cannot be loaded."""
    from transformers import Sam2Model  # heavy: imported only when SAM 2 weights are loaded

    try:
        model = load_pretrained(Sam2Model, name_or_path, "SAM 2", SAM2_OPTION, dtype=dtype)
    except ModelUnavailable as exc:
        raise Sam2Unavailable(str(exc)) from None
    return model.to(device).eval()


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> (1, 3, size, size) float tensor, bilinear resize + ImageNet normalisation."""
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def image_key(image: Image.Image) -> str:
    """Content hash, so the same picture re-sent by the UI reuses its embedding."""
    h = hashlib.sha1(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class Sam2Predictor:
    """Clicks and boxes -> candidate masks for one image at a time, reusing the image embedding across clicks."""

    def __init__(self, model: Any, device: str = "cpu", cache_size: int = 4):
        self.model = model
        self.device = device
        self.input_size = int(model.config.vision_config.backbone_config.image_size[0])
        self.cache_size = cache_size
        self._cache: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.encoder_calls = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = DEFAULT_SAM2, device: str = "cpu") -> Sam2Predictor:
        return cls(load_sam2(name_or_path, device=device), device=device)

    def embed(self, image: Image.Image) -> list[torch.Tensor]:
        key = image_key(image)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        dtype = next(self.model.parameters()).dtype
        pixels = preprocess(image, self.input_size).to(self.device, dtype)
        with torch.inference_mode():
            emb = self.model.get_image_embeddings(pixels)
        self.encoder_calls += 1
        self._cache[key] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def predict(self, image: Image.Image, points: list[list[float]] | None = None, labels: list[int] | None = None,
                box: list[float] | None = None, multimask: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(masks bool (N, H, W), scores float (N,)) sorted best first; coordinates are in image pixels.

        Prompts are assumed checked by the caller (`annotate.segment`): inside the image, box with positive area.
        """
        w, h = image.size
        sx, sy = self.input_size / w, self.input_size / h
        emb = self.embed(image)
        dtype = emb[-1].dtype
        kwargs: dict[str, torch.Tensor] = {}
        if points:
            pts = torch.tensor([[[[x * sx, y * sy] for x, y in points]]], dtype=dtype, device=self.device)
            labs = labels if labels is not None else [1] * len(points)
            kwargs["input_points"] = pts
            kwargs["input_labels"] = torch.tensor([[list(labs)]], dtype=torch.int64, device=self.device)
        if box is not None:
            x0, y0, x1, y1 = box
            kwargs["input_boxes"] = torch.tensor([[[x0 * sx, y0 * sy, x1 * sx, y1 * sy]]], dtype=dtype,
                                                 device=self.device)
        # SAM's convention: several candidates for an ambiguous single click, one mask once the prompt is specific.
        multi = multimask and (box is None and len(points or []) <= 1)
        with torch.inference_mode():
            out = self.model(image_embeddings=emb, multimask_output=multi, **kwargs)
        logits = out.pred_masks[0, 0].float()  # (N, h_low, w_low)
        scores = out.iou_scores[0, 0].float()
        full = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        order = torch.argsort(scores, descending=True)
        return (full[order] > 0).cpu().numpy(), scores[order].cpu().numpy()
