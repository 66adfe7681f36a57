"""Segmentation backends: GrabCut accuracy, SAM 2 tiny random config end to end, prompt checks, crops."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from annotate.grabcut import grabcut_segment
from annotate.mask_cleanup import refine_mask
from annotate.sam2 import IMAGENET_MEAN, Sam2Predictor, Sam2Unavailable, load_sam2, preprocess
from annotate.segment import Segmenter
from multicrafter.errors import UserError
from multicrafter.masks import mask_box
from multicrafter.reference_crops import face_crop, reference_crop


def synthetic(seed: int = 0, h: int = 120, w: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Noisy two-tone background with a noisy ellipse of a different colour; returns (image, true mask)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 18, (h, w, 3)) + np.array([60, 120, 70])
    img[:, w // 2:] += np.array([50, -30, 40])  # background is not one colour
    yy, xx = np.mgrid[:h, :w]
    true = ((xx - 80) / 38) ** 2 + ((yy - 62) / 27) ** 2 <= 1
    img[true] = rng.normal(0, 18, (true.sum(), 3)) + np.array([200, 80, 50])
    return np.clip(img, 0, 255).astype(np.uint8), true


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---------------------------------------------------------------- GrabCut
def test_grabcut_from_box_recovers_object():
    img, true = synthetic()
    x0, y0, x1, y1 = mask_box(true)
    mask = grabcut_segment(img, box=[x0 - 6, y0 - 6, x1 + 6, y1 + 6])
    assert mask.shape == true.shape and iou(mask, true) >= 0.9


def test_grabcut_from_clicks_recovers_object():
    img, true = synthetic(1)
    mask = grabcut_segment(img, points=[[80, 62], [10, 10], [150, 110]], labels=[1, 0, 0])
    assert iou(mask, true) >= 0.9


def test_segmenter_falls_back_to_grabcut_and_says_so(tmp_path):
    seg = Segmenter(tmp_path / "no-weights-here")
    assert seg.backend == "grabcut" and seg.note.startswith("GrabCut fallback: SAM 2 (")
    assert "no such folder" in seg.note and "MULTICRAFTER_SAM2=/path/to/folder" in seg.note
    assert seg.describe().startswith("**GrabCut fallback** - SAM 2") and "\n" not in seg.describe()
    img, true = synthetic()
    res = seg.segment(img, box=[36, 29, 125, 96])
    assert res.backend == "grabcut" and "GrabCut" in res.note
    assert res.masks.shape == (1, 120, 160) and iou(res.masks[0], true) >= 0.9
    assert Segmenter("grabcut").describe() == "**GrabCut** (GrabCut chosen (sam2=grabcut))"


def test_sam2_offline_and_not_cached_is_one_line_and_grabcut(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (tests always run offline) and an empty cache: the default SAM 2 id is named with the way
    to pass a folder, and the segmenter falls back to GrabCut."""
    from tests.hub_cache import use_hub_cache

    use_hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(Sam2Unavailable) as err:
        load_sam2()
    assert str(err.value) == ("SAM 2 (facebook/sam2.1-hiera-tiny) is not available offline: run once online or pass "
                              "MULTICRAFTER_SAM2=/path/to/folder or --sam2 /path/to/folder")
    assert isinstance(err.value, UserError)
    seg = Segmenter()
    assert seg.backend == "grabcut" and str(err.value) in seg.note
    assert not any((tmp_path / "hub").iterdir())   # nothing fetched, nothing half-written


# ---------------------------------------------------------------- prompt checks and bad input
@pytest.mark.parametrize("kwargs,message", [
    ({"points": [[160, 10]]}, "outside the 160x120 image"),
    ({"points": [[-1, 10]]}, "outside"),
    ({"box": [10, 10, 10, 50]}, "zero area"),
    ({"box": [200, 200, 300, 300]}, "outside"),
    ({"points": [[5, 5]], "labels": [0]}, "positive click"),
    ({"points": [[5, 5]], "labels": [2]}, "label"),
    ({}, "click on the subject"),
])
def test_bad_prompts_give_clear_messages(kwargs, message):
    img, _ = synthetic()
    with pytest.raises(UserError, match=message):
        Segmenter("grabcut").segment(img, **kwargs)


def test_corrupt_and_huge_images(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    seg = Segmenter("grabcut")
    with pytest.raises(UserError, match="not a valid image"):
        seg.segment(bad, box=[0, 0, 5, 5])
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)
    with pytest.raises(UserError, match="too large"):
        seg.segment(huge, box=[0, 0, 5, 5])
    # large but acceptable: segmented on a downscaled copy, masks at full size, with a note
    img, true = synthetic(h=120, w=160)
    big = np.asarray(Image.fromarray(img).resize((1600, 1200), Image.Resampling.NEAREST))
    big_true = np.asarray(Image.fromarray(true).resize((1600, 1200), Image.Resampling.NEAREST))
    res = seg.segment(big, box=[360, 290, 1250, 960])
    assert res.masks.shape == (1, 1200, 1600) and "segmented at 1024x768" in res.note
    assert iou(res.masks[0], big_true) >= 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg", "huge.png"]  # nothing written


# ---------------------------------------------------------------- SAM 2 (tiny random config)
def tiny_sam2_config():
    """What makes Sam2Model small: a 64 px input, 4 narrow Hiera stages, 32-d FPN/prompt/decoder, 1 decoder layer.

    Constraints found: a stage's first block pools with the previous stage's window size // 2, so window sizes
    must stay >= 2 there and no global-attention block may be a stage's first block; feature sizes are the input
    side / 4, / 8, / 16; prompt image_size / patch_size must equal the last feature size.
    """
    from transformers import Sam2Config

    backbone = dict(model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1, image_size=[64, 64],
                    blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                    num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 2, 2, 2],
                    global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
    vision = dict(model_type="sam2_vision_model", backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                  backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=32)
    return Sam2Config(vision_config=vision,
                      prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
                      mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                               iou_head_hidden_dim=16))


@pytest.fixture(scope="module")
def tiny_sam2_dir(tmp_path_factory) -> Path:
    from transformers import Sam2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam2") / "tiny"
    Sam2Model(tiny_sam2_config()).save_pretrained(path)
    return path


def test_sam2_points_and_box_end_to_end(tiny_sam2_dir):
    seg = Segmenter(tiny_sam2_dir)  # the real loading path: local folder
    assert seg.backend == "sam2" and seg.note == ""
    img, _ = synthetic()
    one = seg.segment(img, points=[[80, 62]])
    assert one.backend == "sam2" and one.masks.shape == (3, 120, 160) and one.masks.dtype == bool
    assert one.scores.shape == (3,) and np.all(np.diff(one.scores) <= 0)  # best first
    both = seg.segment(img, points=[[80, 62], [5, 5]], labels=[1, 0])
    assert both.masks.shape == (1, 120, 160)
    boxed = seg.segment(img, box=[36, 29, 125, 96])
    assert boxed.masks.shape == (1, 120, 160) and boxed.scores.shape == (1,)
    mixed = seg.segment(img, points=[[80, 62]], box=[36, 29, 125, 96])
    assert mixed.masks.shape == (1, 120, 160)


def test_sam2_hub_id_loads_from_the_hugging_face_cache_offline(tiny_sam2_dir, tmp_path, monkeypatch):
    """Offline, a hub id whose files are in the cache (models--OWNER--NAME/snapshots/<rev> + refs/main) loads
    through the same from_pretrained call that downloads it online."""
    from multicrafter.metrics import loading
    from tests.hub_cache import place_in_hub_cache, use_hub_cache

    assert loading.hub_kwargs() == {"local_files_only": True}
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    place_in_hub_cache(cache, "facebook/sam2.1-hiera-tiny", tiny_sam2_dir)
    seg = Segmenter()   # the default id
    assert seg.backend == "sam2" and seg.note == ""
    assert seg.describe() == "**SAM 2** (facebook/sam2.1-hiera-tiny)"
    local = Sam2Predictor.from_pretrained(tiny_sam2_dir)
    img, _ = synthetic()
    a, _ = seg.predictor.predict(Image.fromarray(img), [[80, 62]], [1])
    b, _ = local.predict(Image.fromarray(img), [[80, 62]], [1])
    assert np.array_equal(a, b)   # the same weights


def test_sam2_embedding_reused_per_image_and_prompts_scaled(tiny_sam2_dir):
    pred = Sam2Predictor.from_pretrained(tiny_sam2_dir)
    calls, seen = [], {}
    pred.model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    pred.model.prompt_encoder.register_forward_hook(lambda m, args, kw, out: seen.update(kw), with_kwargs=True)
    seg = Segmenter(pred.model)
    img, _ = synthetic()
    for click in ([80, 62], [40, 30], [100, 90]):
        seg.segment(img, points=[click])
    assert len(calls) == 1 and seg.predictor.encoder_calls == 1
    seg.segment(img.copy(), box=[16, 12, 144, 108])  # same content, new array: still cached
    assert len(calls) == 1
    assert torch.allclose(seen["input_boxes"], torch.tensor([[[6.4, 6.4, 57.6, 57.6]]]))  # 160x120 -> 64x64
    seg.segment(img[::-1].copy(), points=[[80, 40]])
    assert len(calls) == 2
    assert torch.allclose(seen["input_points"], torch.tensor([[[[32.0, 40 * 64 / 120]]]]))


def test_sam2_preprocess_is_imagenet_normalised():
    mean_rgb = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)
    x = preprocess(Image.new("RGB", (30, 20), mean_rgb), 64)
    assert x.shape == (1, 3, 64, 64) and x.abs().max() < 0.02
    x = preprocess(Image.new("RGB", (30, 20), (255, 255, 255)), 64)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.2489, 2.4286, 2.64]), atol=1e-3)


# ---------------------------------------------------------------- crops and refinement
def test_refine_mask_fills_holes_and_removes_specks():
    m = np.zeros((60, 60), bool)
    m[10:40, 10:40] = True
    m[20:25, 20:25] = False  # a hole
    m[50, 50] = m[5, 55] = True  # specks
    out = refine_mask(m, min_area=10)
    assert out[22, 22] and not out[50, 50] and not out[5, 55] and out.sum() == 900
    tiny = np.zeros((60, 60), bool)
    tiny[3, 3] = True
    assert refine_mask(tiny, min_area=10).sum() == 1  # the largest part always survives


def test_reference_crop_square_with_background():
    img, true = synthetic()
    crop = reference_crop(img, true, pad=0.1, background="white")
    x0, y0, x1, y1 = mask_box(true)
    side = round(max(x1 - x0, y1 - y0) * 1.2)
    assert crop.size == (side, side)
    arr = np.asarray(crop)
    assert (arr[0, 0] == 255).all() and (arr[side // 2, side // 2] != 255).any()
    kept = np.asarray(reference_crop(img, true, background="keep", size=32))
    assert kept.shape == (32, 32, 3) and not (kept[0, 0] == 255).all()
    with pytest.raises(UserError, match="empty mask"):
        reference_crop(img, np.zeros_like(true))


def test_face_crop_with_dlib():
    spec = importlib.util.find_spec("insightface")
    photo = Path(spec.submodule_search_locations[0]) / "data" / "images" / "Tom_Hanks_54745.png"
    img = Image.open(photo).convert("RGB")
    crop = face_crop(img, size=64)
    assert crop.size == (64, 64)
    with pytest.raises(UserError, match="no face"):
        face_crop(Image.new("RGB", (80, 80), (30, 200, 30)))


def test_face_subject_reference_is_face_crop(tmp_path):
    from multicrafter.dataset_format import DatasetWriter, SubjectSpec
    from multicrafter.reference_crops import detect_faces

    spec = importlib.util.find_spec("insightface")
    img = Image.open(Path(spec.submodule_search_locations[0]) / "data" / "images" / "t1.jpg").convert("RGB")
    img = img.resize((img.width // 2, img.height // 2))
    faces = detect_faces(img)
    assert len(faces) >= 3
    x0, y0, x1, y1 = faces[0]
    mask = np.zeros((img.height, img.width), bool)
    mask[y0:y1, x0:x1] = True
    s = DatasetWriter(tmp_path / "ds").add_sample(img, "people", [SubjectSpec("p", mask, kind="face")])
    ref = Image.open(s.subjects[0].reference)
    assert ref.width == ref.height and abs(ref.width - round((x1 - x0) * 1.8)) <= 2
    far = np.zeros_like(mask)
    far[-5:, :5] = True
    with pytest.raises(UserError, match="no detected face"):
        face_crop(img, mask=far)
