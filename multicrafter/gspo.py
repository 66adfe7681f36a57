"""IPPO's objective: group-normalised advantages from the tripartite reward and the GSPO sequence-ratio loss.

Why sequence-level: with MoE-LoRA, per-step (token-level) GRPO ratios jitter with routing; GSPO averages the
log-ratio over the window steps of one trajectory before exponentiating:
    log s_i = mean_{t in S} (log pi_theta(x_{t+1} | x_t) - log pi_old(x_{t+1} | x_t))
    J       = mean_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)        (the loss is -J)
With |S| = 1 this is exactly per-step PPO clipping.

Advantages are normalised within each prompt's group of G images (zero-mean, unit-std); a group whose rewards are
all equal has no signal and gets advantage 0 (hence zero gradient), and its share is logged as the zero-std fraction.
Two aggregations of the components R_text, R_aes, R_id: `sum` normalises R = sum_k w_k R_k, `per_component`
normalises each R_k within the group first and then takes sum_k w_k norm(R_k) (scale-free across components).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import UserError
from .rewards.base import composite

AGGREGATIONS = ("sum", "per_component")


@dataclass
class Advantages:
    """Group-normalised advantages of one batch, with what the logs report about them."""

    values: torch.Tensor          # (B,) fp32
    zero_std: torch.Tensor        # (num_groups,) bool: groups whose reward had no spread
    reward: torch.Tensor          # (B,) the weighted composite R (for logging, whatever the aggregation)

    @property
    def zero_std_fraction(self) -> float:
        """Share of groups whose rewards were all equal (advantage 0, no gradient)."""
        return float(self.zero_std.float().mean()) if self.zero_std.numel() else 0.0


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or x.ndim != 1 or x.shape[0] % group_size:
        raise UserError(f"{x.shape[0]} rewards do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def normalize_in_groups(x: torch.Tensor, group_size: int, std_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - group mean) / group std (population std); groups with std <= std_eps give 0. Returns (values, zero_std)."""
    g = _groups(x.float(), group_size)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, unbiased=False, keepdim=True)
    zero = std <= std_eps
    out = torch.where(zero, torch.zeros_like(g), (g - mean) / torch.where(zero, torch.ones_like(std), std))
    return out.reshape(-1), zero.reshape(-1)


def compute_advantages(components: Mapping[str, Sequence[float] | torch.Tensor], weights: Mapping[str, float],
                       group_size: int, aggregation: str = "sum", clip: float | None = 5.0,
                       std_eps: float = 1e-6) -> Advantages:
    """Advantages for B = num_groups * group_size samples laid out group after group."""
    if aggregation not in AGGREGATIONS:
        raise UserError(f"reward aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    active = {k: float(w) for k, w in weights.items() if float(w) != 0}
    if not active:
        raise UserError("all reward weights are 0: nothing to optimise")
    comp = {k: torch.as_tensor(components[k], dtype=torch.float32).reshape(-1) for k in active if k in components}
    reward = torch.tensor(composite({k: v.tolist() for k, v in comp.items()}, active), dtype=torch.float32)
    if aggregation == "sum":
        values, zero = normalize_in_groups(reward, group_size, std_eps)
    else:
        values = torch.zeros_like(reward)
        for k, w in active.items():
            values = values + w * normalize_in_groups(comp[k], group_size, std_eps)[0]
        zero = _groups(values, group_size).abs().amax(dim=1) <= std_eps
    if clip is not None and clip > 0:
        values = values.clamp(-clip, clip)
    return Advantages(values=values, zero_std=zero, reward=reward)


@dataclass
class GSPOOutput:
    """The GSPO loss of a batch and the ratio statistics IPPO logs."""

    loss: torch.Tensor            # scalar: -J
    ratio: torch.Tensor           # (B,) sequence ratios s_i (detached)
    step_ratio: torch.Tensor      # (B, |S|) per-step ratios exp(log pi - log pi_old) (detached)
    clip_frac: torch.Tensor       # share of samples whose clipped term was the active one
    approx_kl: torch.Tensor       # 0.5 * mean of squared per-step log-ratios (as Flow-GRPO logs it)


def gspo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              eps_low: float = 0.2, eps_high: float = 0.2) -> GSPOOutput:
    """The GSPO loss over a batch of trajectories. `log_prob`, `old_log_prob`: (B, |S|) window-step log-probs."""
    if log_prob.shape != old_log_prob.shape or log_prob.ndim != 2 or log_prob.shape[0] != advantages.shape[0]:
        raise ValueError(f"shapes: log_prob {tuple(log_prob.shape)}, old {tuple(old_log_prob.shape)}, "
                         f"advantages {tuple(advantages.shape)}")
    log_ratio = log_prob.float() - old_log_prob.float()
    seq_ratio = torch.exp(log_ratio.mean(dim=1))
    adv = advantages.float().to(seq_ratio.device)
    unclipped = seq_ratio * adv
    clipped = torch.clamp(seq_ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_frac = ((clipped < unclipped) & (adv != 0)).float().mean()
        approx_kl = 0.5 * (log_ratio**2).mean()
    return GSPOOutput(loss=loss, ratio=seq_ratio.detach(), step_ratio=torch.exp(log_ratio).detach(),
                      clip_frac=clip_frac, approx_kl=approx_kl)


__all__ = ["AGGREGATIONS", "Advantages", "GSPOOutput", "compute_advantages", "gspo_loss", "normalize_in_groups"]
