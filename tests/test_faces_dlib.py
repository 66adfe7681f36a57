"""Face-Sim with the offline dlib backend on real photos shipped with installed packages.

insightface's t1.jpg (a group of six people, 1280x886) and scikit-image's astronaut (one face). Faces are detected
once per module; the matching tests reuse the embeddings through `match_faces`.
"""

from __future__ import annotations

import os

import insightface
import numpy as np
import pytest
from PIL import Image

from multicrafter.errors import UserError
from multicrafter.metrics.face_dlib import DlibBackend
from multicrafter.metrics.face_sim import face_similarity, match_faces
from multicrafter.metrics.face_types import largest_face

T1 = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")


@pytest.fixture(scope="module")
def backend():
    return DlibBackend()


@pytest.fixture(scope="module")
def group():
    return Image.open(T1).convert("RGB")


@pytest.fixture(scope="module")
def group_faces(backend, group):
    faces = backend.faces(group)
    assert len(faces) == 6
    return sorted(faces, key=lambda f: f.box[0])  # left to right: a stable identity index


def crop_around(img: Image.Image, box, margin: float = 0.5) -> Image.Image:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return img.crop((int(x0 - margin * w), int(y0 - margin * h), int(x1 + margin * w), int(y1 + margin * h)))


@pytest.fixture(scope="module")
def refs(group, group_faces):
    return [crop_around(group, f.box) for f in group_faces]


@pytest.fixture(scope="module")
def ref_faces(backend, refs):
    faces = [largest_face(backend.faces(r)) for r in refs]
    assert all(f is not None for f in faces)
    return faces


def test_group_against_its_own_crops_matches_every_face_to_itself(backend, group, group_faces, ref_faces):
    res = match_faces(group_faces, ref_faces, backend)
    assert res.faces_detected == 6 and len(res.matches) == 6
    assert sorted((m["reference"], m["face"]) for m in res.matches) == [(i, i) for i in range(6)]
    assert min(res.per_reference) > 0.7, res.per_reference
    assert res.face_sim == pytest.approx(sum(res.per_reference) / 6)
    assert res.notes == []


def test_mirror_matches_all_six_correctly(backend, group, group_faces, ref_faces):
    mirror = group.transpose(Image.FLIP_LEFT_RIGHT)
    res = match_faces(backend.faces(mirror), ref_faces, backend)
    assert len(res.matches) == 6
    width = group.width
    for m in res.matches:
        x0, _, x1, _ = group_faces[m["reference"]].box
        mx0, _, mx1, _ = m["box"]
        assert abs(mx0 - (width - x1)) < 20 and abs(mx1 - (width - x0)) < 20, (m, x0, x1)
        assert m["similarity"] > 0.4 and m["raw"] < 0.36   # dlib distance well inside the 0.6 same-person radius
    assert res.face_sim > 0.5


def test_reference_order_does_not_change_the_score(backend, group_faces, ref_faces):
    base = match_faces(group_faces, ref_faces, backend)
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = match_faces(group_faces, [ref_faces[p] for p in perm], backend)
    assert shuffled.face_sim == pytest.approx(base.face_sim, abs=1e-12)
    for m in shuffled.matches:
        assert m["face"] == perm[m["reference"]]


def test_one_face_cannot_serve_two_identities(backend, group, group_faces, ref_faces):
    """Paste face A over face B: B's reference loses its match; the two copies of A count once."""
    a, b = group_faces[0], group_faces[2]
    pasted = group.copy()
    bw, bh = int(b.box[2] - b.box[0]), int(b.box[3] - b.box[1])
    src = crop_around(group, a.box, margin=0.3).resize((int(bw * 1.6), int(bh * 1.6)), Image.BICUBIC)
    pasted.paste(src, (int(b.box[0] - 0.3 * bw), int(b.box[1] - 0.3 * bh)))
    before = match_faces(group_faces, ref_faces, backend)
    after = match_faces(backend.faces(pasted), ref_faces, backend)
    assert after.faces_detected == 6           # the pasted copy is found as a face
    assert after.per_reference[2] < 0.2        # nobody left who looks like B
    assert after.per_reference[0] > 0.7        # A is still matched (once)
    assert after.face_sim < before.face_sim - 0.1
    assert any("reference(s) [2]" in n for n in after.notes)
    # Two references of A and B against an image that shows A twice: at most one of them can be served by A.
    two_a = match_faces([a, a], [ref_faces[0], ref_faces[2]], backend)
    assert two_a.face_sim <= 0.5 + 1e-9
    assert match_faces([a, b], [ref_faces[0], ref_faces[2]], backend).face_sim > two_a.face_sim + 0.3


def test_astronaut_single_face_and_strangers(backend, ref_faces):
    from skimage import data

    astro = Image.fromarray(data.astronaut())
    everything = backend.faces(astro)                 # dlib's default threshold 0 also finds a weak false positive
    faces = DlibBackend(threshold=0.5).faces(astro)   # the score threshold removes it
    assert len(faces) == 1 and len(everything) >= 1
    assert faces[0].box == everything[0].box          # faces come best first
    own = crop_around(astro, faces[0].box, margin=0.6)
    assert face_similarity(astro, [own], backend).face_sim > 0.7
    strangers = match_faces(faces, ref_faces, backend)
    assert strangers.face_sim < 0.1 and all(m["similarity"] < 0.5 for m in strangers.matches)


def test_image_without_a_face_scores_zero_with_a_note(backend, refs):
    from skimage import data

    res = face_similarity(Image.fromarray(data.coffee()), refs[:2], backend)
    assert res.face_sim == 0.0 and res.faces_detected == 0 and res.matches == []
    assert any("no face detected" in n for n in res.notes)
    res = face_similarity(refs[0], [Image.new("RGB", (200, 200), (120, 120, 120))], backend)
    assert res.face_sim == 0.0 and res.reference_faces == [0]
    assert any("no face found in reference 0" in n for n in res.notes)


def test_greyscale_and_array_inputs_work(backend, group, ref_faces):
    grey = group.convert("L")
    res = match_faces(backend.faces(grey), ref_faces, backend)
    assert res.faces_detected == 6 and res.face_sim > 0.5
    assert len(backend.faces(np.asarray(grey.resize((640, 443))))) >= 5   # a 2-D numpy array is accepted too


def test_tiny_huge_and_corrupt_inputs(backend, refs, group, tmp_path):
    res = face_similarity(Image.new("RGB", (16, 16)), refs[:1], backend)
    assert res.face_sim == 0.0 and any("too small" in n for n in res.notes)
    assert backend.faces(Image.new("RGB", (1, 1))) == []
    with pytest.raises(UserError, match="too large"):
        backend.faces(Image.new("L", (9000, 8000)))
    big = group.resize((group.width * 3, group.height * 3), Image.BILINEAR)   # 3840 px: downscaled to detect
    faces = backend.faces(big)
    assert len(faces) == 6 and max(f.box[2] for f in faces) > 3000          # boxes in the big image's pixels
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(UserError, match="not a valid image") as err:
        face_similarity(bad, refs[:1], backend)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="at least one reference"):
        face_similarity(group, [], backend)
