"""Losses: the Dice attention loss against the paper's formula, flow matching pieces, timestep sampling."""

import pytest
import torch

from multicrafter.losses import (
    TimestepSampling,
    bleed_loss,
    dice_loss,
    flow_matching_loss,
    masks_to_grid,
    noisy_latents,
    sample_sigmas,
)


def paper_dice(pred, mask, eps):
    """L_attn = sum_i (1 - (2 sum_j M^_ij M_ij + eps) / (sum_j M^_ij + sum_j M_ij + eps)), written out by loops."""
    total = 0.0
    for b in range(pred.shape[0]):
        s = 0.0
        for i in range(pred.shape[1]):
            inter = sum(float(pred[b, i, j] * mask[b, i, j]) for j in range(pred.shape[2]))
            s += 1 - (2 * inter + eps) / (float(pred[b, i].sum()) + float(mask[b, i].sum()) + eps)
        total += s
    return total / pred.shape[0]


@pytest.mark.parametrize("eps", [1e-6, 1.0])
def test_dice_matches_paper_formula(eps):
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(2, 3, 20, generator=g)
    mask = (torch.rand(2, 3, 20, generator=g) > 0.5).float()
    assert abs(float(dice_loss(pred, mask, eps=eps)) - paper_dice(pred, mask, eps)) < 1e-5


def test_dice_zero_for_identical_binary_maps_and_positive_otherwise():
    mask = (torch.rand(2, 2, 16) > 0.5).float()
    mask[:, :, 0] = 1
    assert float(dice_loss(mask.clone(), mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(dice_loss(1 - mask, mask)) > 1.0


def test_dice_skips_empty_masks():
    pred = torch.rand(1, 2, 16)
    mask = torch.zeros(1, 2, 16)
    mask[0, 0, :4] = 1
    only_first = dice_loss(pred[:, :1], mask[:, :1])
    assert torch.allclose(dice_loss(pred, mask), only_first)


def test_masks_to_grid_is_area_fraction():
    m = torch.zeros(1, 1, 32, 32)
    m[..., :16, :8] = 1
    grid = masks_to_grid(m, (2, 2)).reshape(2, 2)
    assert torch.allclose(grid, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_flow_matching_pieces():
    x0, noise = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt, target = noisy_latents(x0, noise, s)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[3], noise[3])
    assert torch.allclose(target, noise - x0)
    # A perfect velocity recovers x0 from x_t: x0 = x_t - s * v.
    assert torch.allclose(xt[1] - 0.25 * target[1], x0[1], atol=1e-6)
    assert flow_matching_loss(target, target) == 0


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "shifted", "flux_shift"])
def test_timestep_sampling(scheme):
    cfg = TimestepSampling(scheme=scheme)
    s1 = sample_sigmas(2000, cfg, torch.Generator().manual_seed(0), mu=1.0)
    s2 = sample_sigmas(2000, cfg, torch.Generator().manual_seed(0), mu=1.0)
    assert torch.equal(s1, s2) and s1.min() > 0 and s1.max() < 1
    if scheme in ("shifted", "flux_shift"):
        assert s1.mean() > 0.6  # shifting moves mass towards high noise
    with pytest.raises(ValueError):
        TimestepSampling(scheme="nope")


def test_shift_is_refused_where_it_would_be_ignored():
    assert TimestepSampling(scheme="shifted").shift == 3.0
    with pytest.raises(ValueError, match="shifted only"):
        TimestepSampling(scheme="logit_normal", shift=3.0)
    with pytest.raises(ValueError, match="> 0"):
        TimestepSampling(scheme="shifted", shift=0.0)
    strong = sample_sigmas(4000, TimestepSampling(scheme="shifted", shift=6.0), torch.Generator().manual_seed(0))
    mild = sample_sigmas(4000, TimestepSampling(scheme="shifted", shift=1.5), torch.Generator().manual_seed(0))
    assert strong.mean() > mild.mean() + 0.1


def test_bleed_counts_only_mass_on_the_other_subjects():
    """Two subjects on a 1x4 grid: [own a | own b | background | both]. Background is free; the overlap is each one's own."""
    masks = torch.tensor([[[1.0, 0, 0, 1], [0, 1.0, 0, 1]]])
    clean = torch.tensor([[[1.0, 0, 5.0, 1], [0, 1.0, 5.0, 0]]])   # mass on own region and background only
    assert bleed_loss(clean, masks).item() == pytest.approx(0.0, abs=1e-6)
    swapped = torch.tensor([[[0, 1.0, 0, 0], [1.0, 0, 0, 0]]])      # each map entirely on the other subject
    assert bleed_loss(swapped, masks).item() == pytest.approx(2.0, abs=1e-5)
    half = torch.tensor([[[1.0, 1.0, 0, 0], [0, 1.0, 0, 0]]])       # subject 0: half its subject mass on b
    assert bleed_loss(half, masks).item() == pytest.approx(0.5, abs=1e-5)
    assert bleed_loss(7 * half, masks).item() == pytest.approx(0.5, abs=1e-5)   # scale-free
    lone = torch.tensor([[[0.2, 0.9, 0.4, 0.1], [0.0, 0.0, 0.0, 0.0]]])
    lone_masks = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0]]])    # one subject (+ padding): nothing to bleed into
    assert bleed_loss(lone, lone_masks).item() == 0.0
