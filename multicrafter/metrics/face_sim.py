"""Face-Sim / R_id: detect faces in a generated image, embed them, and Hungarian-match them to reference faces.

Each reference photo contributes its largest face. The similarity matrix (references × detected faces) goes through
`hungarian_match`, so each generated face serves at most one reference: two copies of one "average" face cannot
score for two people. Face-Sim = sum of matched similarities / number of references; a reference with no matched
face (none detected, or only faces of other people) contributes 0, which also makes the score order-invariant.

Every backend maps its similarity into [0, 1] with 0 meaning "not this person" (see each backend's docstring:
`dlib` uses 1 − distance/0.6 clipped, `insightface` the ArcFace cosine clipped at 0). Clipping matters for the
reward: a wrong face must never score below a missing face, or the policy learns to draw no faces at all.

Works with any `FaceBackend` (see `face_types`); `face_registry.get_backend` builds one by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..io import load_image
from .face_types import MIN_SIDE, Face, FaceBackend, FaceSimResult, largest_face
from .hungarian import hungarian_match

__all__ = ["CACHE_LIMIT", "RefCache", "face_similarity", "image_key", "match_faces", "reference_faces"]


def match_faces(generated: Sequence[Face], references: Sequence[Face | None], backend: FaceBackend,
                notes: Sequence[str] = ()) -> FaceSimResult:
    """Hungarian Face-Sim from already detected faces (reuse embeddings across calls, e.g. in a reward loop)."""
    n_ref = len(references)
    notes = list(notes)
    sim = np.zeros((n_ref, len(generated)))
    raw = np.full((n_ref, len(generated)), np.nan)
    ref_rows = [i for i, f in enumerate(references) if f is not None]
    if ref_rows and generated:
        a = np.stack([references[i].embedding for i in ref_rows])  # type: ignore[union-attr]
        b = np.stack([f.embedding for f in generated])
        s, r = backend.similarity(a, b)
        sim[ref_rows], raw[ref_rows] = s, r
    if not generated:
        notes.append("no face detected in the generated image: Face-Sim is 0")
    result = hungarian_match(sim, min_similarity=1e-9)  # a zero-similarity "match" is no match
    matches = [{"reference": i, "face": j, "similarity": s, "raw": float(raw[i, j]),
                "box": [round(float(v), 1) for v in generated[j].box]} for i, j, s in result.matches]
    unmatched = [i for i in range(n_ref) if result.per_reference[i] == 0 and references[i] is not None]
    if generated and unmatched:
        notes.append(f"no generated face resembles reference(s) {unmatched}: they score 0")
    return FaceSimResult(face_sim=result.score, matches=matches, per_reference=result.per_reference,
                         faces_detected=len(generated), reference_faces=[], backend=backend.name,
                         scale=backend.scale, notes=notes)


def image_key(img: Image.Image) -> str:
    """Content hash of an image (pixels, size and mode), for caching per-image work such as reference faces."""
    return hashlib.sha1(img.tobytes() + repr((img.size, img.mode)).encode()).hexdigest()


RefCache = dict[str, tuple[Face | None, int]]   # image_key -> (largest face, faces found)
CACHE_LIMIT = 512


def reference_faces(references: Sequence[Any], backend: FaceBackend,
                    cache: RefCache | None = None) -> tuple[list[Face | None], list[int], list[str]]:
    """Largest face of each reference photo; a reference without a face is None (it will score 0) with a note.

    With `cache` (a dict owned by the caller, e.g. a reward reused over many rollouts with the same references)
    each distinct reference image is detected and embedded once; it is emptied when it exceeds CACHE_LIMIT entries.
    Use one cache per backend: entries hold that backend's embeddings.
    """
    faces, counts, notes = [], [], []
    for i, ref in enumerate(references):
        if cache is None:
            found = backend.faces(ref)
            best, count = largest_face(found), len(found)
        else:
            img = load_image(ref, mode="RGB")
            key = image_key(img)
            if key not in cache:
                if len(cache) >= CACHE_LIMIT:
                    cache.clear()
                found = backend.faces(img)
                cache[key] = (largest_face(found), len(found))
            best, count = cache[key]
        counts.append(count)
        faces.append(best)
        if not count:
            notes.append(f"no face found in reference {i}: it scores 0")
        elif count > 1:
            notes.append(f"reference {i} shows {count} faces: the largest is used")
    return faces, counts, notes


def face_similarity(image: Any, references: Sequence[Any], backend: FaceBackend) -> FaceSimResult:
    """Face-Sim of one generated image against reference photos (paths, PIL images or arrays)."""
    if not references:
        raise UserError("face similarity needs at least one reference image")
    image = load_image(image, mode="RGB")
    ref, counts, notes = reference_faces(references, backend)
    if min(image.size) < MIN_SIDE:
        notes.append(f"generated image is {image.width}x{image.height}, too small to find faces")
    result = match_faces(backend.faces(image), ref, backend, notes)
    result.reference_faces = counts
    return result

