"""Annotate tab handlers: clicks -> GrabCut mask (named on screen), brush layers -> mask, dataset save/browse/delete,
validation, bad dataset names, and auto-annotation through a stand-in grounder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from annotate.florence import Grounding
from demo import annotate_tab as at
from multicrafter.dataset_format import load_samples
from multicrafter.errors import UserError
from tests.app_fixtures import scene_image


@pytest.fixture(scope="module")
def backends():
    return at.Backends(sam2="grabcut")


def _truth(size=96):
    m = np.zeros((size, size), bool)
    m[size // 4: size * 3 // 4, size // 4: size * 3 // 4] = True
    return m


def test_clicks_and_box_corners_accumulate():
    p = at.add_click(at.EMPTY_PROMPTS, at.MODES[0], 10, 12)
    p = at.add_click(p, at.MODES[1], 1, 2)
    p = at.add_click(p, at.MODES[2], 50, 40)
    assert json.loads(p)["corner"] == [50, 40] and json.loads(p)["box"] is None
    p = json.loads(at.add_click(p, at.MODES[2], 20, 60))
    assert p["points"] == [[10, 12, 1], [1, 2, 0]] and p["box"] == [20, 40, 50, 60] and "corner" not in p
    with pytest.raises(UserError):
        at.parse_prompts("{not json")


def test_click_segments_the_subject_and_names_the_backend(backends, tmp_path):
    img = scene_image(tmp_path / "scene.png")
    value, mask, crop, status = at.segment(backends, img, json.dumps({"points": [[48, 48, 1]], "box": None}))
    m = mask > 0
    iou = (m & _truth()).sum() / (m | _truth()).sum()
    assert iou > 0.8
    assert "GrabCut" in status and crop is not None
    bg = np.asarray(value["background"]).astype(int)
    tinted = (bg[..., 0] > bg[..., 1] + 40) & (bg[..., 2] > bg[..., 1] + 40)
    assert (tinted == m).mean() > 0.99                      # the editor shows this mask (tinted magenta)
    with pytest.raises(UserError, match="outside"):
        at.segment(backends, img, json.dumps({"points": [[500, 5, 1]], "box": None}))


def test_brush_strokes_add_and_remove_from_the_segmented_mask():
    base = np.zeros((20, 30), bool)
    base[0:4, 0:4] = True
    add = np.zeros((20, 30, 4), np.uint8)
    add[5:10, 5:15] = (255, 0, 255, 255)          # magenta: adds 50 px
    remove = np.zeros((20, 30, 4), np.uint8)
    remove[0:2, 0:4] = (0, 255, 255, 90)          # cyan: removes 8 of the base's 16 px
    m = at.apply_strokes(base, {"background": None, "layers": [add, remove], "composite": None}, (30, 20))
    assert m.sum() == 16 + 50 - 8 and m[7, 7] and not m[0, 0] and m[3, 3]
    up = at.apply_strokes(None, {"layers": [add]}, (60, 40))
    assert up.shape == (40, 60) and up.sum() == 4 * 50
    assert at.apply_strokes(base, {"layers": []}, (30, 20)) is None


def test_save_browse_open_update_delete_validate(tmp_path):
    data = tmp_path / "data"
    img = scene_image(tmp_path / "scene.png")
    mask = _truth().astype(np.uint8) * 255
    pending = at.add_subject(img, "box", "object", mask, [])
    with pytest.raises(UserError, match="already"):
        at.add_subject(img, "box", "object", mask, pending)
    text, name = at.save_sample(data, "toys", None, img, "a red box", "second", "object", np.flip(mask, 1), pending)
    assert "saved" in text
    samples = load_samples(data / "toys")
    assert [s.caption for s in samples] == ["a red box"] and [x.name for x in samples[0].subjects] == ["box", "second"]
    assert np.array_equal(samples[0].subjects[0].load_mask(), _truth())
    items, names = at.browse(data, "toys")
    assert names == [name] and Image.open(items[0][0]).size == (96, 96)
    path, caption, pend = at.open_sample(data, "toys", name)
    assert caption == "a red box" and [p["name"] for p in pend] == ["box", "second"]
    text, _ = at.save_sample(data, "toys", name, path, "edited", None, "object", None, pend[:1])
    assert "updated" in text and load_samples(data / "toys")[0].caption == "edited"
    assert "valid" in at.validate(data, "toys") and "0 error" in at.validate(data, "toys")
    assert "deleted" in at.delete_sample(data, "toys", name)
    assert at.browse(data, "toys")[1] == []


@pytest.mark.parametrize("name,match", [("../evil", "invalid dataset name"), ("a/b", "invalid"), ("", "enter"),
                                        ("missing", "no dataset")])
def test_bad_dataset_names_are_refused(tmp_path, name, match):
    with pytest.raises(UserError, match=match):
        at.validate(tmp_path, name)
    assert not (tmp_path.parent / "evil").exists()


def test_save_refuses_empty_subjects_and_writes_nothing(tmp_path):
    img = scene_image(tmp_path / "scene.png")
    with pytest.raises(UserError, match="at least one subject"):
        at.save_sample(tmp_path / "data", "toys", None, img, "c", "", "object", None, [])
    with pytest.raises(UserError, match="invalid dataset name"):
        at.save_sample(tmp_path / "data", "../x", None, img, "c", "s", "object", _truth(), [])
    assert not (tmp_path / "data").exists() and not (tmp_path / "x").exists()


def test_auto_annotate_uses_the_grounder_and_the_segmenter(backends, tmp_path):
    img = scene_image(tmp_path / "scene.png")
    backends._grounder = lambda image, text: [Grounding(text, [20.0, 20.0, 76.0, 76.0])]
    try:
        pending, status = at.auto_annotate(backends, img, "a red box", "red box", [])
    finally:
        backends._grounder = None
    assert [p["name"] for p in pending] == ["red box"] and "found 1" in status
    iou = (pending[0]["mask"] & _truth()).sum() / (pending[0]["mask"] | _truth()).sum()
    assert iou > 0.8


def test_auto_annotate_without_weights_is_a_clear_message(tmp_path):
    b = at.Backends(sam2="grabcut", florence=str(tmp_path / "no-florence"))
    with pytest.raises(UserError, match="Florence-2 .*no-florence. is not available .no such folder.; pass MULTICR"):
        at.auto_annotate(b, scene_image(tmp_path / "s.png"), "c", "", [])


def test_ui_masks_use_the_shared_threshold_and_count_any_colour_channel(tmp_path):
    from multicrafter.masks import as_bool_mask

    gray = np.zeros((8, 8), np.uint8)
    gray[2:5, 2:5] = 255
    assert np.array_equal(at._as_mask(gray), as_bool_mask(gray))
    assert np.array_equal(at._as_mask(gray.astype(bool)), as_bool_mask(gray))
    assert np.array_equal(at._as_mask((gray > 0).astype(np.uint8)), as_bool_mask(gray))      # 0/1 masks
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0] = (0, 255, 255)                                     # cyan: channel 0 is 0, still a marked pixel
    rgb[1, 1] = (255, 0, 255)
    assert at._as_mask(rgb).sum() == 2 and at._as_mask(Image.fromarray(rgb).convert("RGBA")).sum() == 2
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert at._as_mask(str(tmp_path / "m.png")).sum() == 2
    assert at._as_mask(gray, size=(16, 16)).shape == (16, 16) and at._as_mask(gray, size=(16, 16)).sum() == 36
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError):
        at._as_mask(str(tmp_path / "bad.png"))
