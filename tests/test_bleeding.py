"""Bleeding scores: disjoint maps bleed little, identical maps bleed fully, masks pin the regions exactly."""

import numpy as np
import pytest
import torch

from multicrafter.bleeding import bleeding_report, downsample_mask, map_regions, overlap_matrix
from multicrafter.errors import UserError


def _blob(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))


def test_disjoint_maps_bleed_little_and_do_not_overlap():
    maps = np.stack([_blob(16, 16, 8, 3, 1.2), _blob(16, 16, 8, 12, 1.2)])
    rep = bleeding_report(maps, names=["a", "b"])
    assert rep.region_source == "map"
    assert rep.bleeding.max() < 0.2
    assert rep.overlap[0, 1] < 0.05 and np.allclose(np.diag(rep.overlap), 1.0)
    assert rep.rows()[0][0] == "a"


def test_identical_maps_bleed_fully():
    b = _blob(16, 16, 8, 8, 2.0)
    rep = bleeding_report(torch.tensor(np.stack([b, b])))
    assert np.allclose(rep.bleeding, 1.0)
    assert rep.overlap[0, 1] == pytest.approx(1.0)
    assert not rep.regions.any()


def test_partial_leak_is_between_extremes_and_grows_with_leak():
    a, b = _blob(16, 16, 8, 3, 1.2), _blob(16, 16, 8, 12, 1.2)
    small = bleeding_report(np.stack([a + 0.2 * b, b])).bleeding[0]
    large = bleeding_report(np.stack([a + 0.8 * b, b])).bleeding[0]
    assert 0.0 < small < large < 1.0


def test_masks_define_regions_exactly():
    maps = np.zeros((2, 4, 4))
    maps[0, :, :2] = 1.0        # subject 0 attends to the left half
    maps[0, 0, 3] = 1.0         # ... and one cell on the right (1 of 9 units of mass)
    maps[1, :, 2:] = 1.0
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    right = 255 - left
    rep = bleeding_report(maps, masks=[left, right])
    assert rep.region_source == "mask"
    assert rep.bleeding[0] == pytest.approx(1 / 9)
    assert rep.on_others[0] == pytest.approx(1 / 9)
    assert rep.bleeding[1] == pytest.approx(0.0)


def test_downsample_mask_uses_half_coverage():
    m = np.zeros((32, 32), bool)
    m[:, :12] = True   # 12/16 of the left cell column pair -> left cell 100%, second cell 50% at 4 cols
    grid = downsample_mask(m, (2, 4))
    assert grid[:, 0].all() and grid[:, 1].all() and not grid[:, 2:].any()


def test_single_subject_region_with_peak_fraction_is_its_strong_part():
    reg = map_regions(_blob(8, 8, 4, 4, 1.0)[None], peak_fraction=0.5)
    assert reg[0, 4, 4] and not reg[0, 0, 0]
    assert map_regions(_blob(8, 8, 4, 4, 1.0)[None]).all()   # no competitor, no floor: everything is its own


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError):
        bleeding_report(np.zeros((4, 4)))
    with pytest.raises(UserError):
        bleeding_report(np.zeros((2, 4, 4)), masks=[np.ones((4, 4))])
    with pytest.raises(UserError):
        overlap_matrix(np.full((1, 2, 2), np.nan))


def test_downsample_mask_reads_masks_like_the_dataset(tmp_path):
    """Same binarisation as annotate/metrics (multicrafter.masks): 0/1, 0-255 and a mask file agree."""
    from PIL import Image

    m = np.zeros((32, 32), np.uint8)
    m[:, :16] = 1
    path = tmp_path / "mask.png"
    Image.fromarray(m * 255).save(path)
    want = downsample_mask(m.astype(bool), (2, 4))
    for form in (m, m * 255, Image.fromarray(m * 255), path):
        assert (downsample_mask(form, (2, 4)) == want).all()
    assert want[:, :2].all() and not want[:, 2:].any()
