"""Florence-2 phrase grounding (transformers, native `Florence2ForConditionalGeneration`): names -> boxes -> masks.

This is the paper's data pipeline in small: ground each subject name (or the caption's phrases) to a box, turn each
box into a mask with the segmenter, and leave the result for review in the Annotate tab. Optional: without weights
it raises one clear message and the rest of annotation works unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from multicrafter.dataset_format import DatasetWriter, SubjectSpec
from multicrafter.errors import UserError, one_line
from multicrafter.io import load_image
from multicrafter.masks import mask_box
from multicrafter.metrics.loading import ModelUnavailable, load_pretrained, read_json_config

from .mask_cleanup import refine_mask
from .sam2 import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_FLORENCE = "florence-community/Florence-2-base-ft"
FLORENCE_OPTION = ("MULTICRAFTER_FLORENCE", "--florence")  # how a local copy is passed (app variable, CLI flag)
GROUNDING_PROMPT = "Locate the phrases in the caption: {}"
_LOC = re.compile(r"<loc_(\d+)>")
_PHRASE = re.compile(r"([^<>]*?)((?:<loc_\d+>){4,})")


class FlorenceUnavailable(ModelUnavailable):
    """No Florence-2 weights could be loaded (offline and not cached, a failed download, or a bad folder)."""


@dataclass
class Grounding:
    label: str
    box: list[float]  # [x0, y0, x1, y1] in image pixels


GroundFn = Callable[[Image.Image, str], list[Grounding]]


def parse_grounding(text: str, width: int, height: int, bins: int = 1000) -> list[Grounding]:
    """Florence-2's '<phrase><loc_a><loc_b><loc_c><loc_d>...' text -> boxes (bin centres scaled to the image)."""
    text = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
    out: list[Grounding] = []
    for phrase, locs in _PHRASE.findall(text):
        vals = [int(v) for v in _LOC.findall(locs)]
        for i in range(0, len(vals) - 3, 4):
            x0, y0, x1, y1 = ((v + 0.5) / bins for v in vals[i:i + 4])
            box = [x0 * width, y0 * height, x1 * width, y1 * height]
            if box[2] > box[0] and box[3] > box[1]:
                out.append(Grounding(phrase.strip(), box))
    return out


class FlorenceGrounder:
    """Callable (image, text) -> list[Grounding]; hand-written preprocessing (no torchvision)."""

    def __init__(self, model: Any, tokenizer: Any, image_size: int = 768, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device: str = "cpu", max_new_tokens: int = 256):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        self.image_size, self.mean, self.std = image_size, mean, std
        self.max_new_tokens = max_new_tokens
        strides = model.config.vision_config.patch_stride
        self.num_image_tokens = (image_size // int(np.prod(strides))) ** 2 + 1  # spatial grid + one temporal token

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = DEFAULT_FLORENCE, device: str = "cpu",
                        **kwargs: Any) -> FlorenceGrounder:
        """Load a hub id (downloaded on first use unless HF_HUB_OFFLINE=1) or a local folder; FlorenceUnavailable
        (one line) when it cannot be loaded."""
        from transformers import AutoTokenizer, Florence2ForConditionalGeneration  # heavy: only when grounding is used

        try:
            model = load_pretrained(Florence2ForConditionalGeneration, name_or_path, "Florence-2", FLORENCE_OPTION)
            tok = load_pretrained(AutoTokenizer, name_or_path, "Florence-2 tokenizer", FLORENCE_OPTION)
        except ModelUnavailable as exc:
            raise FlorenceUnavailable(str(exc)) from None
        size, mean, std = 768, IMAGENET_MEAN, IMAGENET_STD
        pre = read_json_config(name_or_path, "preprocessor_config.json") or {}
        s = pre.get("size", size)
        size = int(s.get("height", size) if isinstance(s, dict) else s)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
        return cls(model.to(device), tok, image_size=size, mean=mean, std=std, device=device, **kwargs)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC), np.float32) / 255.0
        arr = (arr - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.device)

    def __call__(self, image: Image.Image, text: str) -> list[Grounding]:
        tok = self.tokenizer
        prompt = tok.bos_token + GROUNDING_PROMPT.format(text) + tok.eos_token
        ids = tok(prompt, add_special_tokens=False).input_ids
        input_ids = torch.tensor([[self.model.config.image_token_id] * self.num_image_tokens + ids], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, pixel_values=self._pixels(image),
                                      max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)
        return parse_grounding(tok.decode(out[0], skip_special_tokens=False), image.width, image.height)


@dataclass
class AutoSubject:
    name: str
    box: list[float]
    mask: np.ndarray
    score: float


def ground_subjects(image: Any, ground: GroundFn, segmenter: Any, names: list[str] | None = None,
                    caption: str = "") -> list[AutoSubject]:
    """Box each name (or, with no names, each phrase Florence finds in the caption) and segment it from its box."""
    img = load_image(image)
    if names:
        found = []
        for name in names:
            hits = ground(img, name)
            if hits:
                found.append(Grounding(name, hits[0].box))
    elif caption.strip():
        found = ground(img, caption)
    else:
        raise UserError("give subject names or a caption to ground")
    out: list[AutoSubject] = []
    seen: set[str] = set()
    for g in found:
        label = g.label or "subject"
        if label in seen:
            continue
        res = segmenter.segment(img, box=g.box, multimask=False)
        mask = refine_mask(res.masks[0])
        if mask.any():
            seen.add(label)
            out.append(AutoSubject(label, mask_box(mask), mask, float(res.scores[0])))
    return out


@dataclass
class PreannotateReport:
    """What `preannotate_dataset` did: subjects found per sample, and the samples it skipped with the reason."""

    found: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def preannotate_dataset(root: str | Path, ground: GroundFn, segmenter: Any,
                        names: list[str] | None = None) -> PreannotateReport:
    """Fill in subjects for every sample that has none, for the review queue.

    One bad sample (no caption and no names, an unreadable image, a segmenter refusal) is skipped with its reason;
    it never stops the rest of the dataset.
    """
    writer = DatasetWriter(root)
    report = PreannotateReport()
    for name in writer.names():
        sample = writer.sample(name)
        if sample.subjects:
            continue
        try:
            subjects = ground_subjects(sample.image, ground, segmenter, names=names, caption=sample.caption)
            specs = [SubjectSpec(name=s.name, mask=s.mask, box=s.box, extra={"auto": True}) for s in subjects]
            if specs:
                writer.update_sample(name, subjects=specs)
        except UserError as exc:
            report.skipped.append((name, one_line(exc)))
            continue
        report.found[name] = [s.name for s in subjects]
    return report
