"""Attention bleeding: how much of each subject's attention falls outside that subject's own region.

The paper's failure mode is attribute leakage: subject i's reference tokens attend to where subject j is drawn. On
the attention maps (N, h, w) this reads as mass of map i lying outside region i. Regions come from annotated masks
when given (the exact definition), otherwise from the maps themselves: region i is where map i is stronger than every
other subject's map (optionally also above `peak_fraction` of its own peak). With that competitive region two
identical maps own nothing (bleeding 1 each) and two disjoint maps own their own blobs (bleeding near 0). With one
subject and no mask there is nothing to compete with: give a mask to get a meaningful number.
`overlap` is the histogram intersection of the maps as distributions: 1 = same place, 0 = disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError
from .masks import as_bool_mask


@dataclass
class BleedingReport:
    """Per subject: how much of its attention map falls outside its region, and how the maps overlap."""

    names: list[str]
    bleeding: np.ndarray    # (N,) fraction of map i's mass outside region i
    on_others: np.ndarray   # (N,) fraction of map i's mass inside other subjects' regions
    overlap: np.ndarray     # (N, N) histogram intersection of the normalised maps (diagonal 1)
    regions: np.ndarray     # (N, h, w) bool
    region_source: str      # "mask" or "map"

    @property
    def mean_bleeding(self) -> float:
        """Bleeding averaged over subjects (0 with none)."""
        return float(self.bleeding.mean()) if len(self.bleeding) else 0.0

    def rows(self) -> list[list[Any]]:
        """One table row per subject: name, bleeding, mass on others, largest overlap with another subject."""
        out = []
        for i, name in enumerate(self.names):
            others = [self.overlap[i, j] for j in range(len(self.names)) if j != i]
            out.append([name, round(float(self.bleeding[i]), 4), round(float(self.on_others[i]), 4),
                        round(float(max(others)), 4) if others else 0.0])
        return out


def _as_maps(maps: Any) -> np.ndarray:
    arr = np.asarray(maps.detach().float().cpu() if hasattr(maps, "detach") else maps, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] < 1:
        raise UserError(f"attention maps must be (subjects, h, w), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise UserError("attention maps contain NaN or inf")
    return np.clip(arr, 0.0, None)


def downsample_mask(mask: Any, grid: tuple[int, int]) -> np.ndarray:
    """A full-size mask (bool, 0/1 or 0-255; HxW; read by `as_bool_mask`) -> bool on the (h, w) token grid: a cell is in when ≥ half covered."""
    m = as_bool_mask(mask).astype(np.float64)
    h, w = grid
    if m.shape == (h, w):
        return m > 0.5
    import cv2  # slow to import, and only this resize needs it: the rest of the module stays numpy-only

    cover = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return cover >= 0.5


def map_regions(maps: Any, peak_fraction: float = 0.0) -> np.ndarray:
    """Competitive regions from the maps alone: subject i strictly strongest (and >= peak_fraction of its peak)."""
    m = _as_maps(maps)
    peaks = m.reshape(len(m), -1).max(1)[:, None, None]
    strong = m >= peak_fraction * np.maximum(peaks, 1e-12)
    strong &= peaks > 0
    if len(m) == 1:
        return strong
    regions = np.zeros_like(strong)
    for i in range(len(m)):
        rest = np.delete(m, i, axis=0).max(0)
        regions[i] = strong[i] & (m[i] > rest)
    return regions


def overlap_matrix(maps: Any) -> np.ndarray:
    """Histogram intersection Σ min(p_i, p_j) of the maps normalised to sum 1."""
    m = _as_maps(maps)
    p = m.reshape(len(m), -1)
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    return np.minimum(p[:, None, :], p[None, :, :]).sum(-1)


def bleeding_report(maps: Any, masks: Sequence[Any] | None = None, names: Sequence[str] | None = None,
                    peak_fraction: float = 0.0) -> BleedingReport:
    """Bleeding per subject (and overlaps) from attention maps; `masks` (one per subject, any size) pin the regions."""
    m = _as_maps(maps)
    n, h, w = m.shape
    names = list(names or [])
    names = [names[i] if i < len(names) and names[i] else f"subject {i + 1}" for i in range(n)]
    if masks:
        if len(masks) != n:
            raise UserError(f"{len(masks)} masks for {n} subjects: give one mask per subject, in order")
        regions = np.stack([downsample_mask(mk, (h, w)) for mk in masks])
        source = "mask"
    else:
        regions = map_regions(m, peak_fraction)
        source = "map"
    total = np.maximum(m.reshape(n, -1).sum(1), 1e-12)
    inside = (m * regions).reshape(n, -1).sum(1)
    on_others = np.zeros(n)
    for i in range(n):
        others = np.delete(regions, i, axis=0).any(0) & ~regions[i] if n > 1 else np.zeros((h, w), bool)
        on_others[i] = (m[i] * others).sum() / total[i]
    return BleedingReport(names=names, bleeding=1.0 - inside / total, on_others=on_others,
                          overlap=overlap_matrix(m), regions=regions, region_source=source)
