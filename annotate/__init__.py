"""Annotation backend: the §6 dataset reader/writer, validation, segmentation (SAM 2 or GrabCut), grounding, crops.

Names are resolved lazily, so `import annotate` stays light (no torch) and `python -m annotate.validate` does not
import its own module twice.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DatasetError": "dataset", "DatasetWriter": "dataset", "Sample": "dataset", "Subject": "dataset",
    "SubjectSpec": "dataset", "load_dataset_samples": "dataset", "sanitize_name": "dataset",
    "Problem": "validate", "validate_dataset": "validate",
    "Segmenter": "segment", "SegmentResult": "segment",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'annotate' has no attribute {name!r}")
