"""The sampler IPPO trains through: FLUX's sigma schedule, the Euler (ODE) step, the Flow-GRPO SDE step with its
Gaussian log-prob, and the MixGRPO sliding window that says which steps are stochastic (and trained).

Why one module: rollouts and the policy update must use exactly the same step and log-prob code (the first inner
update's ratio is exactly 1 only then), and the window schedule decides both where the SDE runs and what is trained.

SDE step (Flow-GRPO; sigmas decrease, dt = sigma_next - sigma < 0, v the velocity):
    sigma_t = a * sqrt(sigma / (1 - sigma))
    mean    = x + dt * [v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v)]
    std     = sigma_t * sqrt(-dt)
    x'      = mean + std * eps
    log p   = mean over latent dims of log N(x'; mean, std^2), in fp32
With a = 0 the mean is exactly the Euler step x + dt * v. At sigma = 1 (the first step) sqrt(sigma / (1 - sigma))
is infinite; as in Flow-GRPO the denominator then uses `sigma_cap` (the schedule's second sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import UserError

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


# ----------------------------------------------------------------------------------------------- schedule


@dataclass
class FlowSchedule:
    """The T-step schedule of one generation: `sigmas` (T+1, fp32, last 0) and `timesteps` (T, sigma * 1000)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        """Sampling steps T."""
        return int(self.timesteps.shape[0])

    def model_sigma(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What the transformer gets at step i: FluxPipeline casts the timestep to the latents' dtype, then / 1000."""
        return self.timesteps[i : i + 1].to(dtype) / 1000

    @property
    def sigma_cap(self) -> float:
        """Replacement for sigma = 1 in the SDE noise scale (see module docstring)."""
        return float(self.sigmas[1]) if self.num_steps > 1 else 0.5


def flux_mu(scheduler_config: Any, image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift mu for an image of `image_seq_len` packed tokens (scheduler defaults)."""
    # diffusers' FLUX pipeline module loads transformers: only the schedule builders need it, not the SDE step
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler_config
    return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def flux_schedule(scheduler, num_steps: int, image_seq_len: int, device: torch.device | str = "cpu") -> FlowSchedule:
    """Sigmas and timesteps exactly as stock FluxPipeline builds them (linspace(1, 1/T, T), dynamic shift mu from the
    image sequence length), from a fresh copy of `scheduler` so the pipeline's own scheduler state is untouched."""
    # diffusers' FLUX pipeline module loads transformers: only the schedule builders need it, not the SDE step
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    sched = type(scheduler).from_config(scheduler.config)
    cfg = sched.config
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if getattr(cfg, "use_flow_sigmas", False):
        sigmas = None
    mu = flux_mu(cfg, image_seq_len)
    timesteps, _ = retrieve_timesteps(sched, num_steps, device, sigmas=sigmas, mu=mu)
    return FlowSchedule(sigmas=sched.sigmas.to(device=device, dtype=torch.float32), timesteps=timesteps)


# ----------------------------------------------------------------------------------------------- steps


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
               sigma_next: float | torch.Tensor) -> torch.Tensor:
    """The deterministic (ODE) step, in fp32 like FlowMatchEulerDiscreteScheduler.step; returns fp32."""
    dt = _f32(sigma_next, x) - _f32(sigma, x)
    return x.float() + dt * v.float()


@dataclass
class SDEStepOutput:
    """One Flow-GRPO SDE step: the next sample, its log-probability, and the Gaussian it was drawn from."""

    prev_sample: torch.Tensor   # x' (fp32)
    log_prob: torch.Tensor      # (B,) fp32, mean over latent dims; zeros when std == 0 (a = 0: deterministic)
    mean: torch.Tensor          # fp32
    std: torch.Tensor           # 0-d fp32


def sde_noise_scale(sigma: torch.Tensor, noise_level: float, sigma_cap: float) -> torch.Tensor:
    """sigma_t = a * sqrt(sigma / (1 - sigma)), with sigma_cap in the denominator where sigma == 1."""
    denom = 1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_cap), sigma)
    return noise_level * torch.sqrt(sigma / denom)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
             noise_level: float, sigma_cap: float = 0.5, prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> SDEStepOutput:
    """One Flow-GRPO SDE step in fp32. Give `prev_sample` to score a stored transition (the update), else it is drawn
    (from `noise`, or from `generator`). Gradients flow through `v` into the mean and log-prob, never through x'."""
    x32, v32 = x.float(), v.float()
    s, s_next = _f32(sigma, x32), _f32(sigma_next, x32)
    dt = s_next - s
    sigma_t = sde_noise_scale(s, float(noise_level), float(sigma_cap))
    mean = x32 + dt * (v32 + sigma_t**2 / (2 * s) * (x32 + (1 - s) * v32))
    std = sigma_t * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x32.shape, generator=generator, device=x32.device, dtype=torch.float32)
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.detach().float()
    return SDEStepOutput(prev_sample=prev_sample, log_prob=gaussian_log_prob(prev_sample, mean, std),
                         mean=mean, std=std)


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(value; mean, std^2) averaged over every dim but the first, in fp32 (as torch.distributions.Normal)."""
    dims = tuple(range(1, value.ndim))
    if float(std) == 0.0:
        return torch.zeros(value.shape[0], device=value.device, dtype=torch.float32) + 0 * mean.sum(dims)
    value, mean, std = value.float(), mean.float(), std.float()
    lp = -((value - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=dims)


def _f32(s: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(s, dtype=torch.float32, device=like.device).reshape(())


# ----------------------------------------------------------------------------------------------- window


@dataclass
class WindowSchedule:
    """MixGRPO's sliding window over T sampling steps: S = [c, c + w) is SDE (and trained), the rest is ODE.

    `progressive`: c starts at 0 and advances by `stride` every `interval` iterations; once c would pass
    `max_start` (default T - w, the last start whose window fits) it rolls back to 0. `random`: c is drawn uniformly
    from [0, max_start] every `interval` iterations (seeded, so a resumed run draws the same windows). The schedule is
    a pure function of the iteration, so resuming needs no extra state.
    """

    num_steps: int
    size: int = 2
    stride: int = 1
    interval: int = 1
    strategy: str = "progressive"
    max_start: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        t, w = self.num_steps, self.size
        if t < 1:
            raise UserError(f"window: num_steps must be >= 1, got {t}")
        if not 1 <= w <= t:
            raise UserError(f"window size must be in 1..{t} (the number of sampling steps), got {w}: "
                            "an empty window trains nothing")
        if self.stride < 1 or self.interval < 1:
            raise UserError(f"window stride and interval must be >= 1, got {self.stride} and {self.interval}")
        if self.strategy not in ("progressive", "random"):
            raise UserError(f"window strategy must be 'progressive' or 'random', got {self.strategy!r}")
        last = t - w
        if self.max_start is None:
            self.max_start = last
        if not 0 <= self.max_start <= last:
            raise UserError(f"window max_start must be in 0..{last} (T - w), got {self.max_start}")

    def start(self, iteration: int) -> int:
        """Window start c at training iteration `iteration` (0-based)."""
        moves = max(0, int(iteration)) // self.interval
        if self.strategy == "random":
            rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), moves]))
            return int(rng.integers(0, self.max_start + 1))
        positions = self.max_start // self.stride + 1      # starts 0, s, 2s, ... <= max_start, then back to 0
        return (moves % positions) * self.stride

    def steps(self, iteration: int) -> list[int]:
        """The window's step indices (never empty)."""
        c = self.start(iteration)
        return list(range(c, min(c + self.size, self.num_steps)))


__all__ = [
    "FlowSchedule", "SDEStepOutput", "WindowSchedule", "euler_step", "flux_schedule", "gaussian_log_prob",
    "sde_noise_scale", "sde_step",
]
