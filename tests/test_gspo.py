"""GSPO objective and group advantages: normalisation per prompt group, zero-std groups, clipping, |S| = 1 == PPO."""

import pytest
import torch

from multicrafter.errors import UserError
from multicrafter.gspo import compute_advantages, gspo_loss, normalize_in_groups


def test_advantages_are_zero_mean_unit_std_within_each_group():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=g) * torch.tensor([1.0] * 4 + [10.0] * 4 + [0.1] * 4) + torch.arange(12.0)
    adv = compute_advantages({"text": r}, {"text": 1.0}, group_size=4, clip=None)
    groups = adv.values.reshape(3, 4)
    assert torch.allclose(groups.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(groups.std(1, unbiased=False), torch.ones(3), atol=1e-5)
    # normalised within its own group, not the batch: the group offsets (0..11) do not leak in
    own = (r[4:8] - r[4:8].mean()) / r[4:8].std(unbiased=False)
    assert torch.allclose(groups[1], own, atol=1e-5)


def test_zero_std_group_gets_zero_advantage_and_is_counted():
    r = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.1, 0.5, 0.2, 0.9])
    adv = compute_advantages({"id": r}, {"id": 2.0}, group_size=4)
    assert torch.equal(adv.values[:4], torch.zeros(4))
    assert adv.values[4:].abs().sum() > 0
    assert adv.zero_std.tolist() == [True, False] and adv.zero_std_fraction == 0.5
    assert torch.allclose(adv.reward, 2 * r)


def test_zero_advantage_gives_zero_gradient():
    theta = torch.randn(4, 3, requires_grad=True)
    old = torch.randn(4, 3)
    logp = old + 0.1 * theta                      # a policy whose log-probs depend on theta
    adv = compute_advantages({"aes": torch.full((4,), 0.7)}, {"aes": 1.0}, group_size=4).values
    out = gspo_loss(logp, old, adv, 0.2, 0.2)
    out.loss.backward()
    assert torch.equal(theta.grad, torch.zeros_like(theta))


def test_advantages_are_clipped():
    r = torch.tensor([0.0] * 9 + [1.0])             # the outlier is 3 std above the group mean
    adv = compute_advantages({"text": r}, {"text": 1.0}, group_size=10, clip=2.0)
    assert float(adv.values.max()) == 2.0
    raw = compute_advantages({"text": r}, {"text": 1.0}, group_size=10, clip=None)
    assert float(raw.values.max()) == pytest.approx(3.0)


def test_aggregations_sum_versus_per_component():
    text = torch.tensor([0.20, 0.30, 0.25, 0.35])     # CLIP-T-like scale
    aes = torch.tensor([5.0, 7.0, 6.0, 4.0])          # AES-like scale
    weights = {"text": 1.0, "aes": 1.0}
    summed = compute_advantages({"text": text, "aes": aes}, weights, 4, "sum", clip=None)
    per = compute_advantages({"text": text, "aes": aes}, weights, 4, "per_component", clip=None)
    assert torch.allclose(summed.values, normalize_in_groups(text + aes, 4)[0], atol=1e-6)
    expected = normalize_in_groups(text, 4)[0] + normalize_in_groups(aes, 4)[0]
    assert torch.allclose(per.values, expected, atol=1e-6)
    assert torch.allclose(per.values.reshape(1, 4).mean(1), torch.zeros(1), atol=1e-6)
    # sample 3 has the best text and the worst AES: per component they cancel, in the raw sum AES drowns text
    assert abs(float(per.values[3])) < 1e-5 and float(summed.values[3]) < -1
    assert torch.allclose(per.reward, text + aes)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(UserError, match="aggregation"):
        compute_advantages({"text": [1.0, 2.0]}, {"text": 1.0}, 2, aggregation="mean")
    with pytest.raises(UserError, match="not computed"):
        compute_advantages({"text": [1.0, 2.0]}, {"text": 1.0, "id": 1.0}, 2)
    with pytest.raises(UserError, match="all reward weights are 0"):
        compute_advantages({"text": [1.0, 2.0]}, {"text": 0.0}, 2)
    with pytest.raises(UserError, match="groups of 3"):
        compute_advantages({"text": [1.0, 2.0]}, {"text": 1.0}, 3)


def _ppo(logp, old, adv, lo, hi):
    r = torch.exp(logp - old)
    return -torch.minimum(r * adv, torch.clamp(r, 1 - lo, 1 + hi) * adv).mean()


def test_gspo_with_one_window_step_is_per_step_ppo_clipping():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(16, 1, generator=g)
    delta = 0.5 * torch.randn(16, 1, generator=g)                 # ratios well outside the clip range too
    adv = torch.randn(16, generator=g)
    a = (old + delta).clone().requires_grad_(True)
    b = (old + delta).clone().requires_grad_(True)
    ours = gspo_loss(a, old, adv, 0.1, 0.3)
    ref = _ppo(b[:, 0], old[:, 0], adv, 0.1, 0.3)
    assert torch.allclose(ours.loss, ref, atol=1e-7)
    ours.loss.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert 0 < float(ours.clip_frac) < 1


def test_gspo_sequence_ratio_is_the_geometric_mean_over_window_steps():
    old = torch.zeros(3, 4)
    logp = torch.tensor([[0.1, -0.1, 0.2, 0.0], [0.4, 0.4, 0.4, 0.4], [-1.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 1.0, -1.0])
    out = gspo_loss(logp, old, adv, 0.2, 0.2)
    s = torch.exp(logp.mean(1))
    assert torch.allclose(out.ratio, s)
    assert torch.allclose(out.step_ratio, torch.exp(logp))
    # sample 1: s = e^0.4 > 1.2 with A > 0 -> clipped; sample 2: s = e^-0.25 < 0.8 with A < 0 -> clipped
    expect = -(s[0] * 1 + 1.2 * 1 + (-0.8)) / 3
    assert torch.allclose(out.loss, expect)
    assert float(out.clip_frac) == pytest.approx(2 / 3)
    assert float(out.approx_kl) == pytest.approx(0.5 * float((logp**2).mean()))


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    lp = torch.randn(5, 2)
    adv = torch.randn(5)
    out = gspo_loss(lp, lp.clone(), adv)
    assert torch.equal(out.ratio, torch.ones(5)) and float(out.clip_frac) == 0.0
    assert torch.allclose(out.loss, -adv.mean())
