"""Training losses: rectified-flow matching (FLUX-style timestep sampling) and the paper's Dice attention loss.

Pre-training objective: L = L_diff + lambda * L_attn.
  L_diff: x_t = (1 - s) x_0 + s * eps, the transformer predicts v = eps - x_0, mean squared error.
  L_attn: sum over subjects i of 1 - (2 sum_j M^_ij M_ij + e) / (sum_j M^_ij + sum_j M_ij + e), with M^ the
          normalised attention map and M the subject mask area-resized to the packed latent grid.
          (`bleed_loss` is our alternative: only the share of each map on the other subjects.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TIMESTEP_SCHEMES = ("logit_normal", "uniform", "shifted", "flux_shift")


@dataclass
class TimestepSampling:
    """How training sigmas are drawn. `flux_shift` uses FLUX's resolution-dependent shift mu (as inference does)."""

    scheme: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    # `shifted` only (default 3): s' = shift*s / (1 + (shift-1)*s). Refused with other schemes, which would ignore it
    # (the toy base configs once set it beside logit_normal, believing it did something).
    shift: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in TIMESTEP_SCHEMES:
            raise ValueError(f"timestep scheme must be one of {TIMESTEP_SCHEMES}, got {self.scheme!r}")
        if self.scheme != "shifted" and self.shift is not None:
            raise ValueError(f"timesteps.shift applies to scheme: shifted only (scheme {self.scheme} would ignore it)")
        if self.scheme == "shifted":
            self.shift = 3.0 if self.shift is None else float(self.shift)
            if not self.shift > 0:
                raise ValueError(f"timesteps.shift must be > 0, got {self.shift}")


def sample_sigmas(batch: int, cfg: TimestepSampling, generator: torch.Generator | None = None,
                  mu: float | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise levels in (0, 1) for a batch, on CPU generator then moved (reproducible across devices)."""
    if cfg.scheme == "uniform":
        u = torch.rand(batch, generator=generator)
    else:
        u = torch.sigmoid(cfg.mean + cfg.std * torch.randn(batch, generator=generator))
    if cfg.scheme == "shifted":
        u = cfg.shift * u / (1 + (cfg.shift - 1) * u)
    elif cfg.scheme == "flux_shift":
        m = 0.0 if mu is None else mu
        u = math.exp(m) / (math.exp(m) + (1 / u.clamp(1e-6, 1 - 1e-6) - 1))
    return u.clamp(1e-4, 1 - 1e-4).to(device)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow interpolation and its velocity target: (x_t, v = noise - x0)."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target velocity, in fp32."""
    return F.mse_loss(pred.float(), target.float())


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, H, W) masks in [0, 1] -> (B, N, h*w) area fractions on the packed latent grid."""
    b, n = masks.shape[:2]
    small = F.interpolate(masks.float().reshape(b * n, 1, *masks.shape[-2:]), size=grid, mode="area")
    return small.reshape(b, n, grid[0] * grid[1])


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's Dice attention loss, summed over subjects and averaged over the batch.

    pred: (B, N, T) normalised attention maps; target: (B, N, T) masks on the same grid. Subjects whose mask is
    empty (fully occluded, or padding when samples have fewer subjects) are skipped via `valid` (B, N).
    """
    pred, target = pred.float(), target.float()
    inter = (pred * target).sum(-1)
    denom = pred.sum(-1) + target.sum(-1)
    per_subject = 1 - (2 * inter + eps) / (denom + eps)
    if valid is None:
        valid = target.sum(-1) > 0
    per_subject = per_subject * valid.to(per_subject.dtype)
    return per_subject.sum(-1).mean()


def bleed_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention bleeding alone (our extension): the share of subject i's map that lies on the *other* subjects.

    Of the map's mass inside any subject's mask, the fraction inside masks other than i's own, summed over subjects
    and averaged over the batch. The background is free (unlike Dice, which also asks for zero there), a lone subject
    costs nothing, and the ratio ignores the map's scale. pred, target: (B, N, T) as for `dice_loss`.
    """
    pred, target = pred.float(), target.float()
    others = (target.sum(1, keepdim=True) - target).clamp(0, 1) * (1 - target).clamp(0, 1)
    on_own, on_others = (pred * target).sum(-1), (pred * others).sum(-1)
    per_subject = on_others / (on_own + on_others + eps)
    if valid is None:
        valid = target.sum(-1) > 0
    return (per_subject * valid.to(per_subject.dtype)).sum(-1).mean()
