"""Offline fallback segmenter: OpenCV GrabCut seeded from a box and/or clicks.

Used when no SAM 2 weights are present, so annotation still works on a fresh offline machine. It needs no model,
only colour statistics, and is good on the clean, high-contrast subjects of small hand-made sets.
"""

from __future__ import annotations

import cv2
import numpy as np

from multicrafter.errors import UserError


def grabcut_segment(image: np.ndarray, box: list[float] | None = None, points: list[list[float]] | None = None,
                    labels: list[int] | None = None, iterations: int = 5, seed_radius: int | None = None) -> np.ndarray:
    """HxW bool mask from an HxWx3 uint8 RGB image, a box [x0, y0, x1, y1] and/or clicks (label 1 = object, 0 = not).

    A box marks everything outside it as background. With clicks only, each positive click seeds a sure-foreground
    disc inside a probable-foreground region; negative clicks seed sure background.
    """
    h, w = image.shape[:2]
    points = [] if points is None else points
    labels = [1] * len(points) if labels is None else labels
    if box is None and not any(lab == 1 for lab in labels):
        raise UserError("GrabCut needs a box or at least one positive click")
    r = seed_radius or max(2, round(min(h, w) * 0.02))
    mask = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        mask[:] = cv2.GC_BGD
        mask[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = cv2.GC_PR_FGD
    else:
        for (x, y), lab in zip(points, labels):
            if lab == 1:
                cv2.circle(mask, (int(x), int(y)), max(h, w) // 6, int(cv2.GC_PR_FGD), -1)
    for (x, y), lab in zip(points, labels):
        cv2.circle(mask, (int(x), int(y)), r, int(cv2.GC_FGD if lab == 1 else cv2.GC_BGD), -1)
    if not ((mask == cv2.GC_BGD) | (mask == cv2.GC_PR_BGD)).any():
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = cv2.GC_PR_BGD  # GrabCut needs some background
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.setRNGSeed(0)
    cv2.grabCut(bgr, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
