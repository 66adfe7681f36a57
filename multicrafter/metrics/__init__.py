"""Metrics: Hungarian multi-ID matching (shared by faces, objects and ToyWorld) and the paper's image metrics.

CLIP-T/CLIP-I (`clip`), DINO-I (`dino`), AES (`aesthetic`), Face-Sim (`face_sim`; shared types in `face_types`,
backends `face_dlib` and `face_insightface` chosen by name in `face_registry`), object ID-Sim (`objects`) and the
table row (`table`) are imported lazily so that `hungarian_match` stays light.
"""

from importlib import import_module
from typing import Any

from .hungarian import HungarianResult, hungarian_match

_LAZY = {
    "ModelUnavailable": "loading",
    "ClipScorer": "clip",
    "DinoScorer": "dino",
    "AestheticScorer": "aesthetic",
    "FaceSimResult": "face_types",
    "face_similarity": "face_sim",
    "get_backend": "face_registry",
    "subject_similarity": "objects",
    "load_metric_models": "table",
    "image_metrics": "table",
}

__all__ = ["HungarianResult", "hungarian_match", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
