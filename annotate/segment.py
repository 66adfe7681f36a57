"""The one segmentation entry point the app calls: SAM 2 when its weights load, GrabCut otherwise (and it says so).

Prompts are checked here, once, for both backends: clicks inside the image, labels 0/1, boxes with positive area.
Large images are segmented on a downscaled copy and the masks are returned at the image's full size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from multicrafter.errors import UserError
from multicrafter.io import load_image

from .grabcut import grabcut_segment

WORK_SIDE = {"sam2": 2048, "grabcut": 1024}  # longest side each backend works at (GrabCut is slow on big images)


@dataclass
class SegmentResult:
    masks: np.ndarray  # (N, H, W) bool, best first, at the input image's size
    scores: np.ndarray  # (N,) float: SAM 2's predicted IoU, or 1.0 for GrabCut's single mask
    backend: str  # "sam2" | "grabcut"
    note: str = ""  # for the user: why GrabCut is used, or that the image was downscaled


def check_prompts(width: int, height: int, points: Any, labels: Any, box: Any) -> tuple[list, list, list | None]:
    """Normalised (points, labels, box) or a UserError that names the bad prompt."""
    points = [] if points is None else [list(p) for p in points]
    labels = [1] * len(points) if labels is None else [int(v) for v in labels]
    if len(labels) != len(points):
        raise UserError(f"{len(points)} clicks but {len(labels)} labels")
    for (x, y), lab in zip(points, labels):
        if not (math.isfinite(x) and math.isfinite(y)) or not (0 <= x < width and 0 <= y < height):
            raise UserError(f"click ({x:g}, {y:g}) is outside the {width}x{height} image")
        if lab not in (0, 1):
            raise UserError(f"click label must be 1 (object) or 0 (background), got {lab}")
    if box is not None:
        vals = [float(v) for v in box]
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
            raise UserError(f"box must be four numbers [x0, y0, x1, y1], got {box!r}")
        x0, x1 = sorted((vals[0], vals[2]))
        y0, y1 = sorted((vals[1], vals[3]))
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise UserError(f"box {box!r} has zero area; drag a rectangle around the subject")
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise UserError(f"box {box!r} lies outside the {width}x{height} image")
        box = [x0, y0, x1, y1]
    if not points and box is None:
        raise UserError("click on the subject or draw a box around it first")
    if box is None and not any(lab == 1 for lab in labels):
        raise UserError("add at least one positive click (on the subject) or a box")
    return points, labels, box


class Segmenter:
    """segment(image, points, labels, box) -> SegmentResult, whatever backend is available."""

    def __init__(self, sam2: str | os.PathLike | Any | None = None, device: str = "cpu"):
        """`sam2`: hub id or folder (default facebook/sam2.1-hiera-tiny, downloaded on first use unless
        HF_HUB_OFFLINE=1), a loaded Sam2Model, or "grabcut"."""
        self.predictor = None
        self.note = ""     # added to every result: why GrabCut is used
        self.reason = ""   # why SAM 2 is not in use (one line), empty when it is
        self.source = ""
        if isinstance(sam2, str) and sam2 == "grabcut":
            self.reason = "GrabCut chosen (sam2=grabcut)"
            self.note = self.reason
            return
        from . import sam2 as sam2_backend  # imports torch: only when SAM 2 is wanted, GrabCut-only use stays light

        if sam2 is None or isinstance(sam2, (str, os.PathLike)):
            self.source = str(sam2 or sam2_backend.DEFAULT_SAM2)
            try:
                self.predictor = sam2_backend.Sam2Predictor.from_pretrained(self.source, device=device)
            except sam2_backend.Sam2Unavailable as exc:
                self.reason = str(exc)
                self.note = f"GrabCut fallback: {exc}"
        else:
            self.source = "a loaded Sam2Model"
            self.predictor = sam2_backend.Sam2Predictor(sam2, device=device)

    @property
    def backend(self) -> str:
        return "sam2" if self.predictor is not None else "grabcut"

    def describe(self) -> str:
        """The backend in use and why, in markdown: '**SAM 2** (facebook/sam2.1-hiera-tiny)' or
        '**GrabCut fallback** - SAM 2 (...) is not available offline: ...'."""
        if self.predictor is not None:
            return f"**SAM 2** ({self.source})"
        if self.source:
            return f"**GrabCut fallback** - {self.reason}"
        return f"**GrabCut** ({self.reason})" if self.reason else "**GrabCut**"

    def segment(self, image: Any, points: Any = None, labels: Any = None, box: Any = None,
                multimask: bool = True) -> SegmentResult:
        img = load_image(image)
        w, h = img.size
        points, labels, box = check_prompts(w, h, points, labels, box)
        side = WORK_SIDE[self.backend]
        scale = min(1.0, side / max(w, h))
        notes = [self.note] if self.note else []
        work = img
        if scale < 1.0:
            work = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
            notes.append(f"image is {w}x{h}; segmented at {work.width}x{work.height} and the masks upscaled")
            sx, sy = work.width / w, work.height / h
            points = [[min(x * sx, work.width - 1), min(y * sy, work.height - 1)] for x, y in points]
            box = None if box is None else [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        if self.predictor is not None:
            masks, scores = self.predictor.predict(work, points, labels, box, multimask=multimask)
        else:
            masks = grabcut_segment(np.asarray(work), box=box, points=points, labels=labels)[None]
            scores = np.ones(1, np.float32)
        if work is not img:
            masks = np.stack([cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
                              for m in masks])
        return SegmentResult(masks=masks, scores=np.asarray(scores, np.float32), backend=self.backend,
                             note="; ".join(notes))
