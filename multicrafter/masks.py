"""One reading of a subject mask for the whole project: annotation, training, metrics and bleeding agree.

A mask may arrive as bool, 0/1 or 0-255 (array or PIL 'L'/'1'/RGB image, or a file): 0/1 masks must not read as
empty, and 0-255 masks are cut at half intensity.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .io import load_image


def as_bool_mask(mask: Any) -> np.ndarray:
    """Accept a bool/0-1/0-255 array, a PIL image or an image path; return HxW bool (>= 128, or >= 1 for 0/1)."""
    if isinstance(mask, (str, os.PathLike)):
        mask = load_image(mask, mode="L")
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise UserError(f"mask must be a 2-D array, got shape {tuple(arr.shape)}")
    if arr.dtype == bool:
        return arr.copy()
    return arr >= (128 if arr.max(initial=0) > 1 else 1)


def mask_box(mask: Any) -> list[int] | None:
    """[x0, y0, x1, y1] with exclusive x1/y1, or None for an empty mask."""
    m = as_bool_mask(mask)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
