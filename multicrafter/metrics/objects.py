"""Per-subject DINO-I / CLIP-I for object subjects, Hungarian-matched like Face-Sim.

With subject masks for the generated image (from the annotator or a segmenter), each mask's bounding box is cropped
and embedded, and references are matched one-to-one to crops, so one well-drawn subject cannot stand in for two.
Without masks every reference is compared with the whole image and the score is the mean (the DreamBench form;
no matching is possible with a single region). Similarities are cosines clipped at 0, so an unrelated crop never
scores below a missing subject.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..io import load_image
from ..masks import as_bool_mask
from ..masks import mask_box as bool_mask_box
from .hungarian import hungarian_match

Embed = Callable[[Sequence[Image.Image]], torch.Tensor]   # e.g. DinoScorer.image_embeddings, ClipScorer's


@dataclass
class SubjectSimResult:
    """Object ID-Sim of one generated image against its references, with the matched pairs and notes."""

    score: float
    matches: list[dict[str, Any]]            # {"reference", "crop", "similarity", "box"}
    per_reference: list[float]
    crops: int                               # regions compared (1 = whole image)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return {"score": self.score, "matches": self.matches, "per_reference": self.per_reference,
                "crops": self.crops, "notes": self.notes}


def mask_box(mask: Any, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of a mask's foreground at image size (read as `as_bool_mask` reads it, so a 0/1
    mask is not empty); None if empty."""
    m = as_bool_mask(mask)
    if (m.shape[1], m.shape[0]) != size:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255, mode="L").resize(size, Image.NEAREST)) > 127
    box = bool_mask_box(m)
    return None if box is None else (box[0], box[1], box[2], box[3])


def subject_similarity(image: Any, references: Sequence[Any], embed: Embed,
                       masks: Sequence[Any] | None = None) -> SubjectSimResult:
    """ID-Sim of object subjects: crops from `masks` (Hungarian-matched) or the whole image (mean over references)."""
    if not references:
        raise UserError("subject similarity needs at least one reference image")
    img = load_image(image, mode="RGB")
    refs = [load_image(r, mode="RGB") for r in references]
    notes: list[str] = []
    crops, boxes = [img], [(0, 0, img.width, img.height)]
    if masks is not None:
        crops, boxes = [], []
        for k, m in enumerate(masks):
            box = mask_box(m, img.size)
            if box is None:
                notes.append(f"mask {k} is empty: no crop")
                continue
            crops.append(img.crop(box))
            boxes.append(box)
    if not crops:
        notes.append("no subject region in the generated image: score 0")
        return SubjectSimResult(0.0, [], [0.0] * len(refs), 0, notes)
    emb = embed(refs + crops)
    sim = (emb[: len(refs)] @ emb[len(refs):].T).numpy().astype(np.float64)
    sim = np.clip(sim, 0.0, None)
    if masks is None:
        per_ref = sim[:, 0].tolist()
        matches = [{"reference": i, "crop": 0, "similarity": s, "box": list(boxes[0])} for i, s in enumerate(per_ref)]
        notes.append("no masks of the subjects in this image: each reference is compared with the whole image "
                     "(no one-to-one matching)")
        return SubjectSimResult(float(np.mean(per_ref)), matches, per_ref, 1, notes)
    res = hungarian_match(sim, min_similarity=1e-9)
    matches = [{"reference": i, "crop": j, "similarity": s, "box": list(boxes[j])} for i, j, s in res.matches]
    return SubjectSimResult(res.score, matches, res.per_reference, len(crops), notes)
