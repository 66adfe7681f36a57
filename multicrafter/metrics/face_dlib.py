"""The offline face backend: dlib's HOG detector, 5-point alignment and 128-d ResNet embedder.

All three models ship as files with `dlib-bin` + `face-recognition-models`, so this works with no network.

Similarity scale: dlib's embedder is trained so that two photos of the same person lie within Euclidean distance
0.6 (its documented decision threshold; ≈99.4% on LFW). We report s = clip(1 − d / 0.6, 0, 1): 1 for identical
embeddings, ≈0.5–0.7 for the same person in different photos, 0 at or beyond the threshold (different people).
Cosine similarity of these descriptors is a poor scale (0.8–0.9 even for strangers), which is why the distance is
used. The raw distance is kept in every match report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .face_types import Face, dlib_model_dir, hog_detect, prepare_rgb, too_small
from .loading import ModelUnavailable

SAME_PERSON_DISTANCE = 0.6
CHIP_SIZE, CHIP_PADDING = 150, 0.25   # what dlib_face_recognition_resnet_model_v1 was trained on


class DlibBackend:
    """HOG detection (score threshold) → 5 landmarks → aligned 150 px chip → 128-d descriptor."""

    name = "dlib"
    scale = "1 - euclidean distance / 0.6 on dlib 128-d descriptors, clipped to [0, 1] (0 = different person)"

    def __init__(self, threshold: float = 0.0, upsample: int | None = None, max_side: int = 1600,
                 models: str | Path | None = None, **_: Any) -> None:
        """`threshold`: minimum HOG detector score (dlib's own default is 0; raise it to drop weak detections).
        `upsample`: image doublings before detection; None = 1 for images under 1000 px (HOG finds faces ≥ 80 px),
        else 0. `max_side`: larger images are downscaled first (speed; boxes are reported in original pixels)."""
        try:
            import dlib  # optional dependency (dlib-bin), loaded only when this backend is built
        except ImportError:
            raise ModelUnavailable("the dlib face backend needs the dlib-bin package (pip install dlib-bin)") from None
        folder = Path(models) if models else dlib_model_dir()
        paths = {k: folder / f for k, f in (("sp", "shape_predictor_5_face_landmarks.dat"),
                                            ("rec", "dlib_face_recognition_resnet_model_v1.dat"))}
        for p in paths.values():
            if not p.is_file():
                raise ModelUnavailable(f"dlib model file missing: {p}")
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(paths["sp"]))
        self.encoder = dlib.face_recognition_model_v1(str(paths["rec"]))
        self.threshold = float(threshold)
        self.upsample = upsample
        self.max_side = int(max_side)

    def detect(self, arr: np.ndarray) -> list[tuple[Any, float]]:
        """dlib rectangles with detector scores, best first, on an RGB uint8 array."""
        return hog_detect(self.detector, arr, self.threshold, self.upsample)

    def faces(self, image: Any) -> list[Face]:
        """Every face of the image with its 128-d descriptor, best first; boxes in the input's pixels."""
        arr, scale = prepare_rgb(image, self.max_side)
        if too_small(arr):
            return []
        found = self.detect(arr)
        if not found:
            return []
        shapes = self._dlib.full_object_detections()
        for rect, _ in found:
            shapes.append(self.predictor(arr, rect))
        chips = self._dlib.get_face_chips(arr, shapes, CHIP_SIZE, CHIP_PADDING)
        desc = self.encoder.compute_face_descriptor(list(chips))
        out = []
        for (rect, score), d in zip(found, desc):
            box = tuple(float(v) * scale for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
            out.append(Face(box=box, score=float(score), embedding=np.asarray(d, dtype=np.float64)))
        return out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clip(1 - distance / 0.6, 0, 1), euclidean distance) between two sets of descriptors."""
        dist = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
        return np.clip(1.0 - dist / SAME_PERSON_DISTANCE, 0.0, 1.0), dist

