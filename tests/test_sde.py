"""The sampler IPPO trains through: SDE step vs Euler, its Gaussian log-prob, the FLUX schedule, the MixGRPO window."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from multicrafter.errors import UserError
from multicrafter.presets import FLUX_SCHEDULER
from multicrafter.sde import WindowSchedule, euler_step, flux_schedule, gaussian_log_prob, sde_noise_scale, sde_step


def _xv(seed=0, shape=(3, 8, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.8), (0.7, 0.45), (0.2, 0.0)])
def test_sde_with_zero_noise_is_exactly_euler(sigma, sigma_next):
    x, v = _xv()
    out = sde_step(x, v, sigma, sigma_next, noise_level=0.0, sigma_cap=0.9, generator=torch.Generator().manual_seed(1))
    euler = euler_step(x, v, sigma, sigma_next)
    assert torch.equal(out.prev_sample, euler)
    assert torch.equal(out.mean, euler)
    dt = torch.tensor(sigma_next, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
    assert torch.equal(euler, x + dt * v)
    assert torch.equal(out.log_prob, torch.zeros(3))  # deterministic step: defined, not NaN


@pytest.mark.parametrize("sigma,sigma_next,a", [(0.9, 0.7, 0.7), (0.5, 0.3, 1.0), (0.2, 0.0, 0.3)])
def test_log_prob_equals_torch_normal_mean_over_latent_dims(sigma, sigma_next, a):
    x, v = _xv(1)
    out = sde_step(x, v, sigma, sigma_next, a, generator=torch.Generator().manual_seed(2))
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2))
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (3,)
    assert torch.allclose(out.log_prob, ref, atol=1e-6, rtol=0)


def test_mean_and_std_follow_the_flow_grpo_formula():
    x, v = _xv(2)
    sigma, sigma_next, a = 0.6, 0.35, 0.8
    out = sde_step(x, v, sigma, sigma_next, a, noise=torch.zeros_like(x))
    dt = sigma_next - sigma
    st = a * math.sqrt(sigma / (1 - sigma))
    # Flow-GRPO's own expansion of the same mean
    mean = x * (1 + st**2 / (2 * sigma) * dt) + v * (1 + st**2 * (1 - sigma) / (2 * sigma)) * dt
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert math.isclose(float(out.std), st * math.sqrt(-dt), rel_tol=1e-6)
    assert torch.equal(out.prev_sample, out.mean)  # zero noise


def test_first_step_at_sigma_one_uses_the_cap_and_stays_finite():
    s = sde_noise_scale(torch.tensor(1.0), 0.7, sigma_cap=0.9)
    assert math.isclose(float(s), 0.7 * math.sqrt(1 / 0.1), rel_tol=1e-6)
    x, v = _xv(3)
    out = sde_step(x, v, 1.0, 0.9, 0.7, sigma_cap=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()


def test_samples_have_the_stated_mean_and_std():
    x, v = _xv(4, shape=(1, 64, 64))
    x, v = x.expand(4000, -1, -1)[:, :1, :1].contiguous(), v.expand(4000, -1, -1)[:, :1, :1].contiguous()
    out = sde_step(x, v, 0.5, 0.3, 1.0, generator=torch.Generator().manual_seed(5))
    assert abs(float(out.prev_sample.mean() - out.mean[0].mean())) < 4 * float(out.std) / math.sqrt(4000)
    assert abs(float(out.prev_sample.std()) / float(out.std) - 1) < 0.05


def test_scoring_a_stored_sample_reproduces_its_log_prob_and_grads_flow_through_v_only():
    x, v = _xv(5)
    drawn = sde_step(x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    v2 = v.clone().requires_grad_(True)
    target = drawn.prev_sample.clone().requires_grad_(True)
    again = sde_step(x, v2, 0.8, 0.6, 0.7, prev_sample=target)
    assert torch.equal(again.log_prob, drawn.log_prob)
    again.log_prob.sum().backward()
    assert v2.grad is not None and v2.grad.abs().sum() > 0
    assert target.grad is None


def test_bf16_inputs_give_fp32_log_probs():
    x, v = _xv(6)
    out = sde_step(x.bfloat16(), v.bfloat16(), 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    assert torch.allclose(gaussian_log_prob(out.prev_sample, out.mean, out.std), out.log_prob)


def test_flux_schedule_matches_the_pipeline_scheduler():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    fs = flux_schedule(sched, 6, image_seq_len=1024)
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    ref.set_timesteps(sigmas=[1 - i / 6 for i in range(6)], mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
    assert fs.num_steps == 6 and fs.sigmas.shape == (7,) and float(fs.sigmas[-1]) == 0.0
    assert torch.allclose(fs.sigmas, ref.sigmas.float(), atol=1e-6)
    assert torch.allclose(fs.timesteps, ref.timesteps, atol=1e-3)
    assert sched.timesteps is None or len(sched.timesteps) != 6  # the passed scheduler is left alone
    assert bool((fs.sigmas[1:] < fs.sigmas[:-1]).all())


# ----------------------------------------------------------------------------------------------- window


def test_progressive_window_advances_by_stride_and_rolls_back_to_zero():
    ws = WindowSchedule(num_steps=16, size=2, stride=1, interval=1)
    starts = [ws.start(i) for i in range(32)]
    assert starts[:15] == list(range(15))               # 0..14: the last window [14, 16) still fits
    assert starts[15] == 0 and starts[16] == 1          # rolled back
    assert ws.steps(14) == [14, 15] and ws.steps(15) == [0, 1]


def test_window_interval_and_stride():
    ws = WindowSchedule(num_steps=8, size=3, stride=2, interval=3)
    # max start 5; starts 0, 2, 4 then back to 0 (6 would pass the end), each held for 3 iterations
    assert [ws.start(i) for i in range(12)] == [0, 0, 0, 2, 2, 2, 4, 4, 4, 0, 0, 0]
    capped = WindowSchedule(num_steps=10, size=2, stride=1, max_start=2)
    assert [capped.start(i) for i in range(5)] == [0, 1, 2, 0, 1]


def test_window_is_never_empty_and_bad_settings_are_refused():
    for t in (1, 2, 5):
        for w in range(1, t + 1):
            ws = WindowSchedule(num_steps=t, size=w, stride=1)
            for i in range(3 * t):
                steps = ws.steps(i)
                assert len(steps) == w and steps[0] >= 0 and steps[-1] < t
    for kwargs in ({"size": 0}, {"size": 5}, {"stride": 0}, {"interval": 0}, {"strategy": "zigzag"},
                   {"max_start": 4}, {"max_start": -1}):
        with pytest.raises(UserError):
            WindowSchedule(**{"num_steps": 4, "size": 2, **kwargs})


def test_random_window_is_seeded_in_range_and_held_for_the_interval():
    ws = WindowSchedule(num_steps=16, size=2, strategy="random", interval=2, seed=3)
    starts = [ws.start(i) for i in range(60)]
    assert all(0 <= s <= 14 for s in starts)
    assert all(starts[2 * k] == starts[2 * k + 1] for k in range(30))
    assert len(set(starts)) > 5
    assert starts == [WindowSchedule(16, 2, strategy="random", interval=2, seed=3).start(i) for i in range(60)]
    assert starts != [WindowSchedule(16, 2, strategy="random", interval=2, seed=4).start(i) for i in range(60)]
