"""What every face backend shares: the `Face` record, the `FaceBackend` interface, the result type and input helpers.

The face modules import in one direction only, so none of them can form a cycle:

    face_types  <-  face_dlib, face_insightface  <-  face_registry
    face_types  <-  face_sim (Face-Sim from any backend)

This module imports no other face module. dlib's HOG detection and the location of dlib's model files live here
too, because both backends use them (insightface can detect with dlib when a pack holds only a recogniser).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..io import load_image
from .loading import ModelUnavailable

MIN_SIDE = 32  # below this no face detector can work; the image scores 0 with a note

__all__ = ["MIN_SIDE", "Face", "FaceBackend", "FaceSimResult", "dlib_model_dir", "hog_detect", "largest_face",
           "prepare_rgb", "too_small"]


@dataclass
class Face:
    """One detected face: its box, the detector's confidence and the backend's identity embedding."""

    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in the input image's pixels
    score: float                             # detector confidence (backend scale)
    embedding: np.ndarray                    # backend embedding (dlib 128-d, ArcFace 512-d)

    @property
    def area(self) -> float:
        """Box area in pixels (0 for a degenerate box)."""
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


class FaceBackend(Protocol):
    """A face detector + embedder; `face_registry.get_backend` builds one by name."""

    name: str
    scale: str   # one line: what a similarity of 0 and 1 mean on this backend

    def faces(self, image: Any) -> list[Face]:
        """Every face in an image (path, PIL image or array), best first."""
        ...

    def similarity(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) × (m, d) → (similarity in [0, 1], raw backend value such as a distance or cosine), both (n, m)."""
        ...


@dataclass
class FaceSimResult:
    """Face-Sim of one generated image against its references, with the matched pairs and notes for the user."""

    face_sim: float
    matches: list[dict[str, Any]]            # {"reference", "face", "similarity", "raw", "box"} per matched pair
    per_reference: list[float]
    faces_detected: int
    reference_faces: list[int]               # faces found in each reference image
    backend: str = ""
    scale: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON form `python -m multicrafter.eval faces` writes."""
        return {"face_sim": self.face_sim, "matches": self.matches, "per_reference": self.per_reference,
                "faces_detected": self.faces_detected, "reference_faces": self.reference_faces,
                "backend": self.backend, "scale": self.scale, "notes": self.notes}


def prepare_rgb(image: Any, max_side: int) -> tuple[np.ndarray, float]:
    """Any image input → contiguous uint8 RGB array, downscaled so its longer side ≤ max_side; returns the scale
    factor (original pixels per array pixel). Greyscale/RGBA/palette images are converted; unreadable ones raise."""
    img = load_image(image, mode="RGB")
    scale = 1.0
    if max(img.size) > max_side:
        scale = max(img.size) / max_side
        img = img.resize((max(1, round(img.width / scale)), max(1, round(img.height / scale))), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)), scale


def too_small(arr: np.ndarray) -> bool:
    """True when an image array is too small for any face detector (it then has no faces)."""
    return min(arr.shape[:2]) < MIN_SIDE


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box, or None when there is none."""
    return max(faces, key=lambda f: f.area) if faces else None


def dlib_model_dir() -> Path:
    """Folder holding dlib's .dat models from face-recognition-models (its __init__ needs pkg_resources, so find
    the files without importing it)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("the dlib face backend needs the face-recognition-models package (pip install it)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def hog_detect(detector: Any, arr: np.ndarray, threshold: float, upsample: int | None) -> list[tuple[Any, float]]:
    """dlib rectangles with scores, best first, on an RGB uint8 array (upsample None: 1 below 1000 px, else 0)."""
    up = upsample if upsample is not None else int(max(arr.shape[:2]) < 1000)
    rects, scores, _ = detector.run(arr, up, threshold)
    return sorted(zip(rects, scores), key=lambda t: -t[1])
