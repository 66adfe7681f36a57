"""The deterministic ToyWorld evaluator: identity similarity (Hungarian), leakage, layout, quality, overall.

Everything is read from pixels, references included (a reference may also be given as an identity spec, which is
rendered canonically first). Scores are defined for every input: an unreadable image, a missing subject or a scene
that cannot be parsed gives 0 for what cannot be measured plus a note, never an exception.

Definitions (per image):
- id_sim: per (reference, found subject) similarity = mean of shape, colour and pattern similarity (posterior
  intersection for shape and pattern, weighted Jaccard of the palette colour histograms); Hungarian assignment, each subject used at
  most once, unmatched references score 0; score = sum of matched similarities / number of references.
- leakage: for each subject matched to reference a (similarity >= MATCH_MIN), and each other reference b: the mean
  over attributes where a and b differ of how much of b shows in the subject (colour: mass of b's colours absent
  from a, relative to their mass in b; shape/pattern: the subject's similarity to b); max over b, mean over subjects.
- leakage_real / leakage_decoy (with a scene spec; else None): the decoy control. leakage_real is the leakage against
  canonical renders of the other subjects; leakage_decoy the same against decoys, each related to a as b is (the
  same attribute where b shares a's; where b differs, a value no subject of the scene has, if one is left).
  leakage_decoy is what the metric reads from a subject's own rendering errors, by chance; leakage_real above it
  is the other subjects' attributes actually bleeding in. Both read canonical renders, so that only whose attributes
  they look for differs; with errors unrelated to the other subjects the gap is about -0.02 +- 0.02 (the control's
  own bias, `bench/decoy_calibration.py`).
- layout: fraction of correct statements of the prompt: each stated subject (found by its stated attributes,
  Hungarian) nearest its named slot (within 0.25 of the size), the background colour and the background texture.
  acc_shape/colour/pattern: fraction of stated subjects found with exactly that attribute. Both need a scene spec or
  a ToyWorld prompt, else 0 with a note.
- quality: palette fidelity, the mean over pixels of clip(1 - (d - 20) / 40, 0, 1) with d the RGB distance to the
  nearest clean colour (subject palette or background tones): hard-edged clean renders score 1, blur/noise less.
- overall = 0.6 id_sim (1 - leakage) + 0.25 layout + 0.15 quality (leakage discounts identity rather than adding
  credit of its own, so an image with no recognisable subject cannot score on "no leakage").
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import UserError
from ..io import load_image
from ..metrics import hungarian_match
from .detect import PRESENCE, Region, classify_background, describe_image, describe_reference
from .prompts import POSITION_PHRASES, parse_prompt
from .render import BACKGROUNDS, TEXTURES, render_reference
from .scenes import slot_centres
from .subjects import COLOUR_ARRAY, COLOUR_NAMES, PATTERNS, SHAPES, Identity, by_id

DECOY_KEYS = ("leakage_real", "leakage_decoy")  # the decoy control's outputs (None unless it ran)
MATCH_MIN = 0.3          # a match below this similarity counts as a missing subject for leakage/layout/accuracy
SLOT_TOLERANCE = 0.25    # fraction of the image size
WEIGHTS = {"identity": 0.6, "layout": 0.25, "quality": 0.15}
METRICS = ("id_sim", "leakage", "layout", "quality", "overall", "acc_shape", "acc_colour", "acc_pattern")
MIN_SIDE = 16


def overall_score(id_sim: float, leakage: float, layout: float, quality: float) -> float:
    """The overall score: identity discounted by leakage, plus layout and quality (weights in WEIGHTS)."""
    w = WEIGHTS
    return w["identity"] * id_sim * (1 - leakage) + w["layout"] * layout + w["quality"] * quality


# ----------------------------------------------------------------------------------------------- similarities


def attribute_similarity(a: Region, b: Region) -> dict[str, float]:
    """Per-attribute similarity in [0, 1] of two regions."""
    union = float(np.maximum(a.colour_hist, b.colour_hist).sum())
    return {
        "shape": float(np.minimum(a.shape_post, b.shape_post).sum()),
        "colour": float(np.minimum(a.colour_hist, b.colour_hist).sum() / union) if union > 0 else 0.0,
        "pattern": float(np.minimum(a.pattern_post, b.pattern_post).sum()),
    }


def identity_similarity(a: Region, b: Region) -> float:
    """Mean of the shape, colour and pattern similarities of two regions, in [0, 1]."""
    s = attribute_similarity(a, b)
    return (s["shape"] + s["colour"] + s["pattern"]) / 3.0


def leakage_of(subject: Region, own: Region, others: Sequence[Region]) -> float:
    """How much of the other references' attributes shows inside a subject matched to `own` (0 = none, 1 = all)."""
    worst = 0.0
    for other in others:
        parts = []
        foreign = (other.colour_hist >= PRESENCE / 2) & (own.colour_hist < PRESENCE / 2)
        if foreign.any():
            parts.append(min(1.0, float(subject.colour_hist[foreign].sum() / other.colour_hist[foreign].sum())))
        own_vs_other = attribute_similarity(own, other)
        subj_vs_other = attribute_similarity(subject, other)
        for attr in ("shape", "pattern"):
            if own_vs_other[attr] < 0.5:
                parts.append(subj_vs_other[attr])
        if parts:
            worst = max(worst, float(np.mean(parts)))
    return worst


def decoy_identity(own: Identity, other: Identity, rng: np.random.Generator,
                   scene: Sequence[Identity] = ()) -> Identity:
    """An identity related to `own` as `other` is: each shape/pattern/colour `other` shares with `own` kept, each it
    does not share replaced by a value neither has, and none that any identity of `scene` has where enough values
    are left (so a decoy never catches another subject's attribute bleeding in)."""
    def pick(options: Sequence[str], avoid: set[str], scene_values: set[str]) -> str:
        free = sorted(set(options) - avoid - scene_values) or sorted(set(options) - avoid)
        return str(rng.choice(free))

    shape = own.shape if other.shape == own.shape else pick(SHAPES, {own.shape, other.shape},
                                                            {i.shape for i in scene})
    pattern = own.pattern if other.pattern == own.pattern else pick(PATTERNS, {own.pattern, other.pattern},
                                                                    {i.pattern for i in scene})
    used = set(own.colours) | set(other.colours)
    scene_colours = {c for i in scene for c in i.colours}
    colours: list[str] = []
    for c in other.colours:
        colours.append(c if c in own.colours else pick(COLOUR_NAMES, used | set(colours), scene_colours))
    return Identity(shape=shape, body=colours[0], accent=colours[1], pattern=pattern)


def decoy_control(found: dict[int, Region], refs: list[Region | None], scene: dict) -> dict[str, float | None]:
    """Leakage against the other subjects and against their decoys, both read from canonical renders so that the
    two differ only in whose attributes they look for (see module docstring); None without a matched subject."""
    ids = [Identity.from_dict(x) for x in scene["subjects"]]
    if not found or len(ids) != len(refs):
        return dict.fromkeys(DECOY_KEYS)
    rng = np.random.default_rng(int.from_bytes(hashlib.blake2b("|".join(i.id for i in ids).encode(),
                                                               digest_size=8).digest(), "big"))
    real, decoy = [], []
    for i in sorted(found):
        others = [k for k in range(len(ids)) if k != i and refs[k] is not None]
        real_refs = [_canonical_reference(ids[k]) for k in others]
        decoy_refs = [_canonical_reference(decoy_identity(ids[i], ids[k], rng, ids)) for k in others]
        real.append(leakage_of(found[i], refs[i], [d for d in real_refs if d is not None]))
        decoy.append(leakage_of(found[i], refs[i], [d for d in decoy_refs if d is not None]))
    return {"leakage_real": float(np.mean(real)), "leakage_decoy": float(np.mean(decoy))}


# ----------------------------------------------------------------------------------------------- inputs


@lru_cache(maxsize=2048)
def _canonical_reference(identity: Identity) -> Region | None:
    return describe_reference(render_reference(identity, 64))


def reference_region(ref: Any) -> Region | None:
    """Descriptor of a reference given as an image (path, PIL, array) or an identity (dict with shape/colours/
    pattern, or Identity). Raises UserError for unreadable images."""
    if isinstance(ref, Identity):
        return _canonical_reference(ref)
    if isinstance(ref, dict):
        return _canonical_reference(Identity.from_dict(ref))
    arr = np.ascontiguousarray(np.asarray(load_image(ref), dtype=np.uint8))
    key = (arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).digest())
    if key not in _REF_CACHE:  # RL groups and eval seeds score many images against the same references
        if len(_REF_CACHE) >= 512:
            _REF_CACHE.pop(next(iter(_REF_CACHE)))
        _REF_CACHE[key] = describe_reference(arr.astype(np.float32))
    return _REF_CACHE[key]


_REF_CACHE: dict[tuple, Region | None] = {}


def _check_truth(truth: dict) -> dict:
    """Raise ValueError unless `truth` states subjects in the ToyWorld vocabulary."""
    subjects = truth.get("subjects")
    if not isinstance(subjects, list):
        raise ValueError("it has no subject list")
    for subj in subjects:
        ident = Identity.from_dict(subj)
        by_id(f"{ident.shape}-{ident.body}-{ident.accent}-{ident.pattern}")
        if subj.get("position") not in POSITION_PHRASES:
            raise ValueError(f"unknown position {subj.get('position')!r}")
    bg = truth.get("background")
    if bg is not None and (bg.get("colour") not in BACKGROUNDS or bg.get("texture") not in TEXTURES):
        raise ValueError(f"unknown background {bg!r}")
    if "size" in truth:
        w, h = truth["size"]
        if int(w) < 1 or int(h) < 1:
            raise ValueError(f"bad size {truth['size']!r}")
    return truth


def _truth(scene: dict | None, prompt: str | None, notes: list[str]) -> dict | None:
    if scene is not None:
        try:
            return _check_truth(scene)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            notes.append(f"scene spec unusable ({exc}): layout not scored")
            return None
    if prompt:
        try:
            return parse_prompt(prompt)
        except ValueError as exc:
            notes.append(f"layout not scored: {exc}")
    return None


def _expected_area(scene: dict | None, h: int, w: int) -> float | None:
    if not scene or "size" not in scene or not scene.get("subjects"):
        return None
    sw, sh = scene["size"]
    scale = (w * h) / float(sw * sh)
    areas = [s["area"] if "area" in s else 0.8 * math.pi * s.get("radius", 0) ** 2 for s in scene["subjects"]]
    return max(areas) * scale if max(areas) > 0 else None


# ----------------------------------------------------------------------------------------------- scores


def quality_score(img: np.ndarray, tones: np.ndarray) -> float:
    """Palette fidelity in [0, 1] (see module docstring)."""
    clean = np.concatenate([COLOUR_ARRAY, tones.astype(np.float32)])
    pix = img.reshape(-1, 3).astype(np.float32)
    d2 = (pix * pix).sum(1)[:, None] - 2 * pix @ clean.T + (clean * clean).sum(1)[None]
    d = np.sqrt(np.maximum(d2.min(1), 0))
    return float(np.clip(1 - (d - 20) / 40, 0, 1).mean())


def _layout(truth: dict, found: dict[int, Region], size: tuple[int, int], bg: dict) -> tuple[float, dict]:
    w, h = size
    subjects = truth["subjects"]
    checks: dict[str, bool] = {}
    try:
        slots = slot_centres([s["position"] for s in subjects])
    except ValueError:
        slots = None
    for k, subj in enumerate(subjects):
        ok = False
        if slots is not None and k in found:
            cx, cy = found[k].centroid[0] / w, found[k].centroid[1] / h
            dist = {name: math.hypot(cx - x, cy - y) for name, (x, y) in slots.items()}
            nearest = min(dist, key=dist.get)
            ok = nearest == subj["position"] and dist[nearest] <= SLOT_TOLERANCE
        checks[f"subject {k} {subj['position']}"] = ok
    if truth.get("background"):
        checks["background colour"] = bg["colour"] == truth["background"]["colour"]
        checks["background texture"] = bg["texture"] == truth["background"]["texture"]
    return float(np.mean(list(checks.values()))) if checks else 0.0, checks


def _empty_result(n_refs: int, notes: list[str]) -> dict:
    return {"id_sim": 0.0, "leakage": 0.0, **dict.fromkeys(DECOY_KEYS), "layout": 0.0, "quality": 0.0,
            "overall": overall_score(0, 0, 0, 0),
            "acc_shape": 0.0, "acc_colour": 0.0, "acc_pattern": 0.0, "n_refs": n_refs, "n_found": 0,
            "matches": [], "per_reference": [0.0] * n_refs, "background": None, "layout_checks": {}, "notes": notes}


def evaluate_image(image: Any, references: Sequence[Any], scene: dict | None = None,
                   prompt: str | None = None, decoys: bool = False) -> dict:
    """Score one image against its references (in the order of the scene's subjects, if a scene is given).

    `image`: path, PIL image or HxWx3 array. `references`: images or identity specs. `scene`: a ToyWorld scene spec
    (truth for layout and attribute accuracy); else `prompt` is parsed for it. `decoys`: also run the decoy control
    (needs `scene`; about 4x the time, so off for rewards). Returns the metrics in METRICS plus leakage_real,
    leakage_decoy (None unless run), matches, per_reference, n_found, background, layout_checks and notes.
    """
    notes: list[str] = []
    n_refs = len(references)
    try:
        img = np.asarray(load_image(image), dtype=np.float32)
    except UserError as exc:
        return _empty_result(n_refs, [f"image unreadable: {exc}"])
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        return _empty_result(n_refs, [f"image too small to score ({w}x{h})"])
    truth = _truth(scene, prompt, notes)
    if truth and "size" in truth and tuple(truth["size"]) != (w, h):
        notes.append(f"image is {w}x{h}, scene is {truth['size'][0]}x{truth['size'][1]}: positions compared "
                     "as fractions of the size")

    refs: list[Region | None] = []
    for k, ref in enumerate(references):
        try:
            region = reference_region(ref)
        except (UserError, KeyError, ValueError, TypeError) as exc:
            notes.append(f"reference {k} unusable: {exc}")
            region = None
        if region is None and not (notes and notes[-1].startswith(f"reference {k}")):
            notes.append(f"reference {k}: no subject found in it")
        refs.append(region)

    expected = len(truth["subjects"]) if truth else n_refs
    regions, tones, fg = describe_image(img, expected=expected or None, expected_area=_expected_area(truth, h, w))
    if len(regions) < n_refs:
        notes.append(f"found {len(regions)} subject(s) for {n_refs} reference(s): missing ones score 0")

    sim = np.zeros((n_refs, len(regions)))
    for i, ref in enumerate(refs):
        if ref is not None:
            for j, reg in enumerate(regions):
                sim[i, j] = identity_similarity(ref, reg)
    match = hungarian_match(sim)
    found = {r: regions[c] for r, c, s in match.matches if s >= MATCH_MIN}

    leaks = [leakage_of(found[i], refs[i], [refs[k] for k in range(n_refs) if k != i and refs[k] is not None])
             for i in found]
    leakage = float(np.mean(leaks)) if leaks else 0.0
    if not found and n_refs:
        notes.append("no subject matched any reference: leakage not measurable, reported as 0")

    bg = classify_background(img, tones, fg)
    layout, checks, acc = 0.0, {}, {"shape": [], "colour": [], "pattern": []}
    if truth is None:
        notes.append("no scene or ToyWorld prompt given: layout scored 0")
    else:
        # text accuracy is judged against the stated subjects (not the references): find each one by its attributes
        stated = [_canonical_reference(Identity.from_dict(x)) for x in truth["subjects"]]
        tsim = np.zeros((len(stated), len(regions)))
        for i, t in enumerate(stated):
            for j, reg in enumerate(regions):
                tsim[i, j] = identity_similarity(t, reg) if t is not None else 0.0
        tmatch = hungarian_match(tsim)
        located = {r: regions[c] for r, c, s in tmatch.matches if s >= MATCH_MIN}
        layout, checks = _layout(truth, located, (w, h), bg)
        for k, subj in enumerate(truth["subjects"]):
            pred = located[k].predicted() if k in located else None
            acc["shape"].append(pred is not None and pred["shape"] == subj["shape"])
            acc["colour"].append(pred is not None and pred["colours"] == sorted(subj["colours"]))
            acc["pattern"].append(pred is not None and pred["pattern"] == subj["pattern"])
    quality = quality_score(img, tones)
    return {
        "id_sim": match.score, "leakage": leakage, "layout": layout, "quality": quality,
        **(decoy_control(found, refs, truth) if decoys and scene is not None and truth is not None
           else dict.fromkeys(DECOY_KEYS)),
        "overall": overall_score(match.score, leakage, layout, quality),
        **{f"acc_{k}": float(np.mean(v)) if v else 0.0 for k, v in acc.items()},
        "n_refs": n_refs, "n_found": len(regions),
        "matches": [[int(r), int(c), round(float(s), 4)] for r, c, s in match.matches],
        "per_reference": [float(x) for x in match.per_reference],
        "background": bg, "layout_checks": checks, "notes": notes,
    }


def evaluate_batch(images: Sequence[Any], references: Sequence[Sequence[Any]],
                   scenes: Sequence[dict | None] | None = None,
                   prompts: Sequence[str | None] | None = None) -> dict:
    """Score many images; returns the mean of each metric in METRICS, n, and the per-image results."""
    n = len(images)
    if len(references) != n:
        raise ValueError(f"{n} images but {len(references)} reference lists")
    scenes = list(scenes) if scenes is not None else [None] * n
    prompts = list(prompts) if prompts is not None else [None] * n
    per = [evaluate_image(images[i], references[i], scenes[i], prompts[i]) for i in range(n)]
    out: dict[str, Any] = {m: float(np.mean([p[m] for p in per])) if per else 0.0 for m in METRICS}
    out["n"] = n
    out["per_image"] = per
    return out
