"""Dataset paths from metadata.jsonl are untrusted text: resolve them only inside the dataset folder.

Shared by the dataset format's reader and validator (`multicrafter.dataset_format`) and the evaluators that read
dataset folders, so a line with an absolute path or `..` is refused the same way everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any


def resolve_inside(root: str | os.PathLike, rel: Any) -> Path:
    """Resolve a metadata path; refuse absolute paths, `..`, backslashes and anything that lands outside `root`."""
    if not isinstance(rel, str) or not rel:
        raise ValueError("path must be a non-empty string")
    if "\\" in rel or rel.startswith("/") or PurePosixPath(rel).is_absolute() or ":" in rel.split("/")[0]:
        raise ValueError(f"path must be relative to the dataset folder: {rel!r}")
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise ValueError(f"path must not contain '..', '.' or empty parts: {rel!r}")
    root_r = Path(root).resolve()
    full = (root_r / rel).resolve()
    if not full.is_relative_to(root_r):
        raise ValueError(f"path leaves the dataset folder: {rel!r}")
    return full
