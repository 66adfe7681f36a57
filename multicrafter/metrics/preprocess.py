"""Image preprocessing for the CLIP/DINO metrics, written with PIL and numpy.

transformers' fast image processors need torchvision, which this project never installs; doing the three steps by
hand (resize the shortest edge, centre-crop, normalise) keeps the metric identical on every install. Settings come
from the checkpoint's preprocessor_config.json when present, else from the family defaults below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..io import load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize (shortest edge, or exact (h, w)), optional centre crop (h, w), scale to [0, 1], normalise."""

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.BICUBIC

    def image(self, img: Image.Image) -> np.ndarray:
        """One image → float32 array (3, H, W), normalised."""
        img = load_image(img, mode="RGB")
        if isinstance(self.resize, int):
            w, h = img.size
            scale = self.resize / min(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
        else:
            size = (self.resize[1], self.resize[0])
        img = img.resize(size, resample=self.resample)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            if w < cw or h < ch:  # pad like the HF processors do when the image is smaller than the crop
                canvas = Image.new("RGB", (max(w, cw), max(h, ch)), (0, 0, 0))
                canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
                img, (w, h) = canvas, canvas.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return arr.transpose(2, 0, 1)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A batch of PIL images → tensor (B, 3, H, W)."""
        return torch.from_numpy(np.stack([self.image(im) for im in images]))


def clip_default(image_size: int) -> ImagePreprocess:
    """OpenAI CLIP: shortest edge to the model's input size, centre crop, CLIP mean/std."""
    return ImagePreprocess(image_size, (image_size, image_size), CLIP_MEAN, CLIP_STD)


def dino_default(image_size: int) -> ImagePreprocess:
    """DINO/DINOv2 (DreamBench): resize to 256/224 of the input size, centre crop, ImageNet mean/std."""
    return ImagePreprocess(round(image_size * 256 / 224), (image_size, image_size), IMAGENET_MEAN, IMAGENET_STD)


def _hw(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    return None


def from_hf_config(cfg: dict[str, Any] | None, default: ImagePreprocess) -> ImagePreprocess:
    """Read a transformers preprocessor_config.json dict; anything missing falls back to `default`."""
    if not cfg:
        return default
    size = cfg.get("size")
    resize: int | tuple[int, int] = default.resize
    if isinstance(size, dict) and "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    elif _hw(size) is not None:
        resize = _hw(size)  # type: ignore[assignment]
    crop = _hw(cfg.get("crop_size")) or default.crop
    if cfg.get("do_center_crop") is False:
        crop = None
    mean = tuple(cfg.get("image_mean", default.mean))
    std = tuple(cfg.get("image_std", default.std))
    resample = int(cfg.get("resample", default.resample))
    return ImagePreprocess(resize, crop, mean, std, resample)  # type: ignore[arg-type]


def embed_in_batches(images: Sequence[Image.Image], preprocess: Any, forward: Any, model: torch.nn.Module,
                     batch_size: int, device: Any, dim: int) -> torch.Tensor:
    """Preprocess and embed images batch by batch: (N, dim) float32 unit vectors on the CPU (CLIP and DINO share it)."""
    out = []
    dtype = next(model.parameters()).dtype
    for i in range(0, len(images), batch_size):
        px = preprocess(images[i:i + batch_size]).to(device, dtype)
        out.append(forward(px).float().cpu())
    if not out:
        return torch.zeros(0, dim)
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
