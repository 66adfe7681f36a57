"""Optimisation shared by the trainers: AdamW with a warm-up + decay schedule, gradient norms, an EMA of the weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from multicrafter.errors import UserError


@dataclass
class OptimConfig:
    """AdamW with warm-up then constant/cosine/linear decay, and gradient clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"        # constant | cosine | linear (decay after warm-up to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0        # <= 0: no clipping (the norm is still logged)
    text_encoder_lr: float | None = None   # with train.train_text_encoders: their lr (None: lr), same schedule

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine", "linear"):
            raise UserError(f"schedule must be constant, cosine or linear, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise UserError(f"lr must be > 0 and warmup_steps >= 0, got {self.lr} and {self.warmup_steps}")


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_optimizer(params: list[torch.nn.Parameter] | list[dict], cfg: OptimConfig, total_steps: int):
    """(AdamW, LambdaLR) over the trainable params, or over torch param groups (dicts with their own "lr"); the
    schedule multiplies every group's lr by the same factor."""
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    return opt, sched


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class EMA:
    """Exponential moving average of trainable parameters (fp32 shadow), swapped in for validation and saving."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.999):
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]
        self._backup: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the EMA weights into the model (call `swap_out` to restore the live weights)."""
        self._backup = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._backup is not None:
            for b, p in zip(self._backup, self.params):
                p.copy_(b)
            self._backup = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise UserError("EMA state does not match the trainable parameters")
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


__all__ = ["EMA", "OptimConfig", "build_optimizer", "grad_norm", "lr_factor"]
