"""Face backends by name: `dlib` (offline default) and `insightface` (optional, needs a local model pack).

Each backend module imports only `face_types`; this module imports the backends (cheap: their heavy libraries load
only when a backend is built), so the import graph of the face modules has no cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UserError
from .face_dlib import DlibBackend
from .face_insightface import InsightFaceBackend
from .face_types import FaceBackend

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "get_backend"]

DEFAULT_BACKEND = "dlib"
BACKENDS: dict[str, Callable[..., FaceBackend]] = {
    "dlib": DlibBackend,                # ships with dlib-bin + face-recognition-models: works offline
    "insightface": InsightFaceBackend,  # ArcFace (the paper's Face-Sim); reads a buffalo_l/antelopev2 folder
}


def get_backend(name: str = DEFAULT_BACKEND, **kwargs: Any) -> FaceBackend:
    """Build the backend called `name` (`dlib` or `insightface`); kwargs go to its constructor."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise UserError(f"unknown face backend '{name}' (expected {' or '.join(BACKENDS)})")
    return factory(**kwargs)
