"""Scene sampling: which identities go where, on which background, with which reference views.

A scene spec is a plain JSON-able dict that fully determines the render, so the evaluator and the rewards can
re-derive masks and attributes from the metadata alone. Scene `index` of seed `seed` is drawn from its own
numpy Generator (SeedSequence([seed, index])), so a dataset of 10 scenes is a prefix of one of 20.
"""

from __future__ import annotations

import argparse

import numpy as np

from .prompts import make_prompt
from .render import BACKGROUNDS, TEXTURES, box_of, render_scene
from .subjects import SIMILAR_KINDS, Identity, identities, similar_pairs

# name -> (positions, centres as fractions of the size, radius range as a fraction of the size)
LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[tuple[float, float], ...], tuple[float, float]]] = {
    "1": (("centre",), ((0.5, 0.5),), (0.24, 0.30)),
    "2h": (("left", "right"), ((0.27, 0.5), (0.73, 0.5)), (0.16, 0.21)),
    "2v": (("top", "bottom"), ((0.5, 0.27), (0.5, 0.73)), (0.16, 0.21)),
    "3h": (("left", "centre", "right"), ((0.18, 0.5), (0.5, 0.5), (0.82, 0.5)), (0.12, 0.15)),
    "3t": (("top left", "top right", "bottom"), ((0.27, 0.27), (0.73, 0.27), (0.5, 0.73)), (0.15, 0.19)),
    "4": (("top left", "top right", "bottom left", "bottom right"),
          ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)), (0.15, 0.19)),
}
LAYOUTS_BY_COUNT = {1: ("1",), 2: ("2h", "2v"), 3: ("3h", "3t"), 4: ("4",)}
JITTER = 0.03                    # fraction of the size
SCENE_ROTATION = 6.0             # degrees, scenes
REF_ROTATION = 12.0              # degrees, references
REF_RADIUS = (0.30, 0.40)        # fraction of the reference size
REF_OFFSET = 0.07                # fraction of the reference size


def subject_counts(text: str) -> tuple[int, ...]:
    """argparse type for `--subjects 2,3`: the subject counts a scene is drawn from (each a count with layouts)."""
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts like 2,3, got {text!r}") from None
    if not counts or any(c not in LAYOUTS_BY_COUNT for c in counts):
        raise argparse.ArgumentTypeError(f"subject counts must be between 1 and 4, got {text!r}")
    return counts


def layout_of_positions(positions: list[str] | tuple[str, ...]) -> str | None:
    """The layout whose positions are exactly these (any order), or None."""
    want = sorted(positions)
    for name, (names, _, _) in LAYOUTS.items():
        if sorted(names) == want:
            return name
    return None


def slot_centres(positions: list[str]) -> dict[str, tuple[float, float]]:
    """Nominal centre (fractions) of each position of the layout these positions form."""
    name = layout_of_positions(positions)
    if name is None:
        raise ValueError(f"positions {positions} form no ToyWorld layout")
    names, centres, _ = LAYOUTS[name]
    return dict(zip(names, centres))


def _pick_identities(rng: np.random.Generator, split: str, n: int, similar: str | None) -> tuple[list[Identity], str | None]:
    pool = identities(split)
    chosen: list[Identity] = []
    kind = None
    if similar and n >= 2:
        kind = similar if similar in SIMILAR_KINDS else SIMILAR_KINDS[int(rng.integers(len(SIMILAR_KINDS)))]
        pairs = similar_pairs(split, kind)
        a, b = pairs[int(rng.integers(len(pairs)))]
        chosen = [a, b]
    while len(chosen) < n:
        cand = pool[int(rng.integers(len(pool)))]
        if cand not in chosen:
            chosen.append(cand)
    order = rng.permutation(n)
    return [chosen[i] for i in order], kind


def sample_scene(seed: int, index: int = 0, split: str = "train", size: int | tuple[int, int] = 128,
                 n_subjects: int | tuple[int, ...] = (2, 3), similar: str | None = None,
                 similar_prob: float = 0.3, ref_size: int = 64) -> dict:
    """Draw scene `index` of `seed`. `n_subjects` is a count or a tuple to choose from (1-4). `similar` forces a
    similar pair ('colour', 'pattern' or 'any'); otherwise one is included with probability `similar_prob`."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    width, height = (size, size) if isinstance(size, int) else size
    counts = (n_subjects,) if isinstance(n_subjects, int) else tuple(n_subjects)
    if not counts or any(c not in LAYOUTS_BY_COUNT for c in counts):
        raise ValueError(f"subject counts must be in 1..4, got {counts}")
    n = counts[int(rng.integers(len(counts)))]
    layout = LAYOUTS_BY_COUNT[n][int(rng.integers(len(LAYOUTS_BY_COUNT[n])))]
    names, centres, (rmin, rmax) = LAYOUTS[layout]
    if similar is None and n >= 2 and rng.random() < similar_prob:
        similar = "any"
    idents, kind = _pick_identities(rng, split, n, similar)
    scale = min(width, height)
    subjects = []
    for ident, pos, (fx, fy) in zip(idents, names, centres):
        jx, jy = rng.uniform(-JITTER, JITTER, size=2)
        subjects.append({
            **ident.to_dict(),
            "name": ident.name,
            "position": pos,
            "center": [round(float((fx + jx) * width), 2), round(float((fy + jy) * height), 2)],
            "radius": round(float(rng.uniform(rmin, rmax) * scale), 2),
            "rotation": round(float(rng.uniform(-SCENE_ROTATION, SCENE_ROTATION)), 1),
            "reference_view": {
                "center": [round(float(0.5 + rng.uniform(-REF_OFFSET, REF_OFFSET)), 3) for _ in range(2)],
                "radius": round(float(rng.uniform(*REF_RADIUS)), 3),
                "rotation": round(float(rng.uniform(-REF_ROTATION, REF_ROTATION)), 1),
            },
        })
    scene = {
        "version": 1,
        "seed": int(seed),
        "index": int(index),
        "split": split,
        "size": [int(width), int(height)],
        "ref_size": int(ref_size),
        "layout": layout,
        "similar": kind,
        "background": {"colour": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
                       "texture": TEXTURES[int(rng.integers(len(TEXTURES)))]},
        "subjects": subjects,
    }
    scene["prompt"] = make_prompt(scene)
    return scene


def with_boxes(scene: dict, labels: np.ndarray | None = None) -> dict:
    """Fill each subject's visible box (and visible pixel fraction) from the render; returns the same dict."""
    if labels is None:
        labels = render_scene(scene)[1]
    for k, subj in enumerate(scene["subjects"]):
        mask = labels == k
        subj["box"] = box_of(mask)
        subj["area"] = int(mask.sum())
    return scene
