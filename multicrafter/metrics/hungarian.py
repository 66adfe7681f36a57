"""The Multi-ID alignment score: each reference is matched to at most one detected subject and vice versa.

This is the paper's anti-hacking device: with one-to-one matching, an image made of two copies of the same
("average") subject cannot score well against two different references. Missing subjects score 0, and the score is
normalised by the number of references, so it is invariant to reference order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class HungarianResult:
    """A one-to-one matching of references to detections and its score."""

    score: float                                   # sum of matched similarities / number of references
    matches: list[tuple[int, int, float]] = field(default_factory=list)  # (reference index, detection index, sim)
    per_reference: list[float] = field(default_factory=list)            # matched similarity per reference (0 if none)


def hungarian_match(similarity: np.ndarray, min_similarity: float | None = None) -> HungarianResult:
    """Match references (rows) to detections (columns) maximising the total similarity.

    `similarity` is (n_references, n_detected). Unmatched references score 0. With `min_similarity`, matches below it
    are dropped (they count as missing). An empty detection set gives score 0. Non-finite entries are never matched.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D (references x detections), got shape {sim.shape}")
    n_ref, n_det = sim.shape
    per_ref = [0.0] * n_ref
    if n_ref == 0:
        return HungarianResult(score=0.0, matches=[], per_reference=[])
    if n_det == 0:
        return HungarianResult(score=0.0, matches=[], per_reference=per_ref)
    # NaN/inf (a failed embedding) must neither be stored as a score nor overflow the solver: such a pair gets a
    # cost no finite pair can lose to, and if the solver still picks it the reference counts as missing (0).
    ok = np.isfinite(sim)
    clean = np.where(ok, sim, -1e6)
    rows, cols = linear_sum_assignment(clean, maximize=True)
    matches = []
    for r, c in zip(rows.tolist(), cols.tolist()):
        if not ok[r, c]:
            continue
        s = float(clean[r, c])
        if min_similarity is not None and s < min_similarity:
            continue
        matches.append((r, c, s))
        per_ref[r] = s
    return HungarianResult(score=float(sum(per_ref) / n_ref), matches=matches, per_reference=per_ref)
