"""Interactive annotation: segmentation (SAM 2 or GrabCut), Florence-2 grounding, mask clean-up, folder import.

The dataset format itself (reader, writer, validator) belongs to the library: `multicrafter.dataset_format`.
`python -m annotate.validate DATASET` and `python -m annotate.import_folder SRC --out DATASET` are the command lines.

Names are resolved lazily, so `import annotate` stays light (no torch, no OpenCV) and `python -m annotate.validate`
does not import its own module twice.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Segmenter": "segment", "SegmentResult": "segment",
    "refine_mask": "mask_cleanup",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'annotate' has no attribute {name!r}")
