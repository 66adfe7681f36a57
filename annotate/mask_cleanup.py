"""Clean up a clicked or grounded mask before it is saved: drop specks, fill holes.

A clicked mask has specks and holes; the trainer downsamples masks to the latent grid, so small specks become
whole wrong tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from multicrafter.masks import as_bool_mask

__all__ = ["refine_mask"]


def refine_mask(mask: Any, min_area: int | float = 0.002, fill_holes: bool = True) -> np.ndarray:
    """Remove specks smaller than `min_area` (pixels, or a fraction of the image when < 1) and fill enclosed holes.

    The largest component is always kept, so refinement never empties a non-empty mask.
    """
    m = as_bool_mask(mask)
    if not m.any():
        return m
    limit = min_area * m.size if min_area < 1 else min_area
    labels, n = ndimage.label(m)
    areas = ndimage.sum_labels(m, labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = areas >= limit
    keep[1 + int(np.argmax(areas))] = True
    out = keep[labels]
    return ndimage.binary_fill_holes(out) if fill_holes else out
