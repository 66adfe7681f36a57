"""IPPO post-training: online GSPO on mixed ODE/SDE rollouts with a MixGRPO sliding window and a tripartite reward.

    python -m train.ippo --config train/configs/tiny_ippo.yaml [--max-steps N] [--output-dir DIR] [--resume]

One iteration (a linear Flow-GRPO-style loop): pick the window S for this iteration; roll out G images for each of
`groups_per_step` prompts (SDE inside S, ODE elsewhere, log pi_old stored for S only); score them (failures are 0,
never a crash); normalise advantages within each prompt's group; then `inner_updates` optimizer steps on the GSPO
loss, each recomputing log pi_theta of the stored window transitions through the same code as the rollout (the first
one has ratio exactly 1, logged as `ratio_first`); log the step and checkpoint. Only adapter parameters train. Prompts
and noise are pure functions of (seed, step, process), so `--resume` continues exactly where the last checkpoint left
off, with one process or several (data parallel: each process rolls out its own prompts, gradients are averaged).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from multicrafter.adapters import DEFAULT_LORA_TARGETS, AdapterConfig, adapter_parameters, add_adapter, save_adapter
from multicrafter.errors import UserError, run_cli
from multicrafter.gspo import compute_advantages, gspo_loss
from multicrafter.io import save_image_atomic
from multicrafter.memory import QUANTIZE_MODES
from multicrafter.moe_lora import MoELoRAConfig, set_router_noise
from multicrafter.ref_timestep import install_ref_timestep
from multicrafter.rewards.base import COMPONENTS
from multicrafter.rollout import (
    GroupContext,
    GroupInput,
    Rollout,
    RolloutOptions,
    encode_group,
    iter_chunks,
    rollout,
    window_log_probs,
)
from multicrafter.sde import WindowSchedule

from .checkpoints import gather_rng_states, load_checkpoint, restore_rank_rng_state, save_on_main, seed_everything
from .config import config_to_dict, load_config, parse_set_overrides, training_parser
from .data import ToyWorldSource
from .ippo_inputs import PromptsConfig, RewardConfig, build_reward, load_prompts, score
from .metrics_log import MetricsLogger
from .optim import OptimConfig, build_optimizer, grad_norm
from .run_setup import build_model, claim_output_dir, freeze, parse_dtype, resume_point, setup_accelerator

# ----------------------------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    name: str = "tiny"                       # tiny | toy | diffusers FLUX folder | hub id
    dtype: str = "fp32"                      # base weights (bf16 on GPU for FLUX)
    adapter: str | None = None               # start from this adapter (folder or named adapter); else a fresh one
    lora_rank: int = 16                      # fresh adapter only
    lora_alpha: float = 16.0
    lora_targets: str | None = None          # regex; default: attention projections (multicrafter.adapters)
    moe: MoELoRAConfig | None = None         # fresh adapter only: MoE-LoRA on FFN linears
    adapter_dtype: str = "fp32"              # trainable weights are kept in this dtype
    # frozen transformer and T5 stored quantised (QLoRA-style): none | int8 | fp8 (torchao, CPU too) | nf4 (CUDA)
    quantize: str = "none"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise UserError(f"model.quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")


@dataclass
class WindowConfig:
    size: int = 2                            # w
    stride: int = 1                          # s
    interval: int = 1                        # tau: iterations between moves
    strategy: str = "progressive"            # progressive | random
    max_start: int | None = None             # latest start (default T - w)


@dataclass
class GSPOConfig:
    eps_low: float = 1e-4                    # clip(s, 1 - eps_low, 1 + eps_high); ratios of mean log-probs are small
    eps_high: float = 1e-4
    adv_clip: float = 5.0
    inner_updates: int = 1                   # optimizer steps per rollout batch

    def __post_init__(self) -> None:
        if self.eps_low < 0 or self.eps_high < 0 or self.inner_updates < 1:
            raise UserError("gspo: eps_low/eps_high must be >= 0 and inner_updates >= 1")


@dataclass
class TrainConfig:
    max_steps: int = 100                     # rollout iterations
    groups_per_step: int = 2                 # prompts per iteration and process
    seed: int = 0
    output_dir: str = "runs/ippo"
    sample_every: int = 10                   # save a grid of the rollout images every N steps (0: never)
    save_every: int = 50                     # checkpoint + adapter every N steps (and at the end)
    keep_last: int = 2
    mixed_precision: str = "no"
    cpu: bool = False
    gradient_accumulation_steps: int = 1     # must be 1: each inner update is one optimizer step over the whole batch

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.groups_per_step < 1 or self.sample_every < 0 or self.save_every < 0:
            raise UserError("train: max_steps, sample_every, save_every must be >= 0 and groups_per_step >= 1")
        if self.gradient_accumulation_steps != 1:
            raise UserError("train.gradient_accumulation_steps must be 1: IPPO already sums gradients over the "
                            "rollout's micro-batches into one optimizer step (raise groups_per_step for larger "
                            f"batches), got {self.gradient_accumulation_steps}")


@dataclass
class IPPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(toyworld=ToyWorldSource()))
    sampling: RolloutOptions = field(default_factory=RolloutOptions)
    window: WindowConfig = field(default_factory=WindowConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.sampling.group_size < 2:
            raise UserError("sampling.group_size must be >= 2: advantages are normalised within a prompt's group")
        if self.sampling.noise_level <= 0:
            raise UserError("sampling.noise_level must be > 0: with a = 0 the window steps are deterministic and "
                            "have no log-prob to optimise")
        self.window_schedule()  # validates size/stride/interval/strategy against num_steps

    def window_schedule(self) -> WindowSchedule:
        w = self.window
        return WindowSchedule(self.sampling.num_steps, w.size, w.stride, w.interval, w.strategy, w.max_start,
                              seed=self.train.seed)


# ----------------------------------------------------------------------------------------------- setup


def setup_adapter(pipe, cfg: ModelConfig) -> list[torch.nn.Parameter]:
    """Load the starting adapter or add a fresh one; return the trainable parameters (adapter only)."""
    transformer = pipe.transformer
    if cfg.adapter:
        pipe.load_adapter(cfg.adapter)
        if pipe.reference_options.ref_timestep_zero:  # trained with references at t = 0: rollouts must match inference
            install_ref_timestep(transformer).enabled = True
    else:
        add_adapter(transformer, AdapterConfig(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                               lora_targets=cfg.lora_targets or DEFAULT_LORA_TARGETS,
                                               moe=cfg.moe, extra={"trained_by": "ippo"}))
        pipe.adapter_name = "ippo"
    set_router_noise(transformer, 0.0)  # GSPO needs identical routing in rollout and update
    dtype = parse_dtype(cfg.adapter_dtype)
    params = adapter_parameters(transformer)
    for p in params:
        p.data = p.data.to(dtype)
    transformer.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.eval()
    return params


# ----------------------------------------------------------------------------------------------- rollout inputs


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def pick_groups(n_prompts: int, step: int, per_process: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Prompt indices of this process at `step` (a fixed permutation per step, cycled when the pool is small)."""
    perm = np.random.default_rng(_seed_for(seed, step, 7)).permutation(n_prompts)
    total = per_process * world
    chosen = [int(perm[i % n_prompts]) for i in range(total)]
    return chosen[rank * per_process : (rank + 1) * per_process]


def cached_groups(cache: dict[int, Any], ids: Sequence[int], encode: Callable[[int], Any],
                  limit: int = 64) -> list[Any]:
    """The encoded groups of `ids`, encoding only new prompts. The cache is bounded (FLUX T5 embeddings are ~4 MB per
    prompt on the GPU); when it is full, every entry except this step's is dropped, never one this step needs."""
    new = [i for i in dict.fromkeys(ids) if i not in cache]
    if new and len(cache) + len(new) > limit:
        keep = {i: cache[i] for i in ids if i in cache}
        cache.clear()
        cache.update(keep)
    for i in new:
        cache[i] = encode(i)
    return [cache[i] for i in ids]


# ----------------------------------------------------------------------------------------------- GSPO update


def policy_update(model, ro: Rollout, advantages: torch.Tensor, cfg: GSPOConfig, optimizer, lr_scheduler,
                  params: list[torch.nn.Parameter], max_grad_norm: float, accelerator=None) -> dict[str, Any]:
    """`cfg.inner_updates` optimizer steps of the GSPO loss on one rollout batch; returns ratio/clip/KL statistics.

    Each step recomputes log pi_theta for every stored window transition in the rollout's own micro-batches."""
    n = ro.num_images
    adv = advantages.to(ro.log_probs.device)
    chunks = list(iter_chunks(ro))
    seq, steps, clips, kls, losses, norms = [], [], [], [], [], []
    first: torch.Tensor | None = None
    for k in range(cfg.inner_updates):
        optimizer.zero_grad(set_to_none=True)
        ratios, total = [], 0.0
        for c, (g, sl) in enumerate(chunks):
            sync = (accelerator is None or accelerator.num_processes == 1 or c == len(chunks) - 1)
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                lp = window_log_probs(model, ro, g, sl)
                out = gspo_loss(lp, ro.log_probs[sl], adv[sl], cfg.eps_low, cfg.eps_high)
                loss = out.loss * ((sl.stop - sl.start) / n)
                accelerator.backward(loss) if accelerator is not None else loss.backward()
            total += float(loss.detach())
            ratios.append(out.ratio)
            steps.append(out.step_ratio)
            clips.append(float(out.clip_frac) * (sl.stop - sl.start) / n)
            kls.append(float(out.approx_kl) * (sl.stop - sl.start) / n)
        ratio = torch.cat(ratios)
        if k == 0:
            first = ratio
        seq.append(ratio)
        losses.append(total)
        if max_grad_norm > 0:
            clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
            norms.append(float(clip(params, max_grad_norm)))
        else:
            norms.append(grad_norm(params))
        optimizer.step()
        lr_scheduler.step()
    seq_all, step_all = torch.cat(seq), torch.cat(steps)     # step_all: (inner * B, |S|)
    inner = cfg.inner_updates
    return {
        "ratio_mean": float(seq_all.mean()), "ratio_min": float(seq_all.min()), "ratio_max": float(seq_all.max()),
        "ratio_std": float(seq_all.std(unbiased=False)),
        "ratio_first": float(first.mean()), "ratio_first_max_dev": float((first - 1).abs().max()),
        "step_ratio_mean": float(step_all.mean()), "step_ratio_min": float(step_all.min()),
        "step_ratio_max": float(step_all.max()),
        "step_ratio_by_window_step": [float(v) for v in step_all.mean(0)],
        "clip_frac": sum(clips) / inner, "approx_kl": sum(kls) / inner,
        "loss": sum(losses) / inner, "grad_norm": sum(norms) / inner,
    }


# ----------------------------------------------------------------------------------------------- the loop


def train(cfg: IPPOConfig, output_dir: str | Path | None = None, max_steps: int | None = None, resume: bool = False,
          reward_fn: Callable | None = None, log: Callable[[str], None] = print, pipe: Any = None) -> dict[str, Any]:
    """Run IPPO; returns {"output_dir", "adapter_dir", "last": last metrics record, "steps": steps run now}.

    `pipe`: an already-built MultiCrafterPipeline to train instead of loading `cfg.model.name` (benchmarks at FLUX
    size with random weights)."""
    out = Path(output_dir or cfg.train.output_dir)
    total = cfg.train.max_steps if max_steps is None else max_steps
    if total < 0:
        raise UserError(f"--max-steps must be >= 0, got {total}")
    accelerator = setup_accelerator(cfg.train, gradient_accumulation_steps=1)
    lock = claim_output_dir(accelerator, out)   # before anything is written there
    try:
        return _train(cfg, accelerator, out, total, resume, reward_fn,
                      log if accelerator.is_main_process else (lambda s: None), pipe)
    finally:
        lock.release()


def _train(cfg: IPPOConfig, accelerator, out: Path, total: int, resume: bool, reward_fn: Callable | None,
           log: Callable[[str], None], pipe: Any = None) -> dict[str, Any]:
    # setup: resume point, reward (config problems surface before any model loads), prompts, model + adapter, optimizer
    ckpt = resume_point(accelerator, out, resume)
    seed_everything(cfg.train.seed)
    reward_fn = reward_fn or build_reward(cfg.reward)
    active, schedule, G = cfg.reward.active, cfg.window_schedule(), cfg.sampling.group_size
    with accelerator.main_process_first():  # the main process writes the ToyWorld prompt set, the others read it
        prompts: list[GroupInput] = load_prompts(cfg.prompts, out)
    if pipe is None:
        pipe = build_model(cfg.model.name, cfg.model.dtype, device=accelerator.device, quantize=cfg.model.quantize)
    else:
        freeze(pipe)
    params = setup_adapter(pipe, cfg.model)
    # The schedule's horizon is train.max_steps even when --max-steps stops earlier, so a run cut short and resumed
    # follows the same learning rates as an uninterrupted one.
    horizon = max(1, cfg.train.max_steps * cfg.gspo.inner_updates)
    optimizer, lr_scheduler = build_optimizer(params, cfg.optim, horizon)
    model, optimizer = accelerator.prepare(pipe.transformer, optimizer)
    named = {n: p for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    adapter_dir = out / "adapter"

    start = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        missing = sorted(set(named) - set(state["adapter"]))
        if missing:
            raise UserError(f"{ckpt}: checkpoint lacks adapter weights such as {missing[0]} (different adapter?)")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["adapter"][n])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        restore_rank_rng_state(accelerator, state["rng"], ckpt)
        start = int(state["step"])
        log(f"resumed from {ckpt} at step {start}")

    def checkpoint(step: int) -> None:
        state = {"step": step, "adapter": {n: p.detach().cpu().clone() for n, p in named.items()},
                 "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "rng": gather_rng_states(accelerator), "config": config_to_dict(cfg)}
        if accelerator.is_main_process:
            save_adapter(pipe.transformer, adapter_dir)
        save_on_main(accelerator, out, step, state, cfg.train.keep_last)

    metrics = MetricsLogger(out, resume_step=start if ckpt is not None else None, enabled=accelerator.is_main_process)
    contexts: dict[int, GroupContext] = {}
    last: dict[str, Any] = {}
    try:
        for step in range(start + 1, total + 1):
            # rollout: this process's prompts, SDE inside the window
            t0 = time.perf_counter()
            window = schedule.steps(step - 1)
            ids = pick_groups(len(prompts), step, cfg.train.groups_per_step, cfg.train.seed,
                              accelerator.process_index, accelerator.num_processes)
            groups = cached_groups(contexts, ids, lambda i: encode_group(pipe, prompts[i], cfg.sampling))
            gen = torch.Generator().manual_seed(_seed_for(cfg.train.seed, step, accelerator.process_index))
            ro = rollout(pipe, groups, window, cfg.sampling, generator=gen, model=model)
            # reward and group-normalised advantages
            t1 = time.perf_counter()
            scores = score(reward_fn, ro, active)
            adv = compute_advantages({k: scores.components[k] for k in active}, active, G,
                                     cfg.reward.aggregation, cfg.gspo.adv_clip)
            # GSPO update
            t2 = time.perf_counter()
            stats = policy_update(model, ro, adv.values, cfg.gspo, optimizer, lr_scheduler, params,
                                  cfg.optim.max_grad_norm, accelerator)
            t3 = time.perf_counter()
            # metrics (every process's rewards), samples, checkpoint
            last = _record(accelerator, step, window, scores, adv, stats, ro, lr_scheduler.get_last_lr()[0],
                           (t1 - t0, t2 - t1, t3 - t2))
            metrics.log(last)
            log(f"step {step}/{total} reward {_fmt(last['reward'])} ratio_first {last['ratio_first']:.6f} "
                f"clip {last['clip_frac']:.3f} kl {last['approx_kl']:.2e} window {window[0]}-{window[-1]} "
                f"zero-std {_fmt(last['zero_std_frac'])} ({t3 - t0:.1f}s)")
            if scores.failed:
                log(f"  reward failures this step: {scores.failed} image(s) scored 0 ({scores.notes[0]})")
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and accelerator.is_main_process:
                save_image_atomic(image_grid(ro.images, G), out / "samples" / f"step_{step:06d}.png")
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total:
                checkpoint(step)
        if total == start and accelerator.is_main_process and not adapter_dir.exists():
            save_adapter(pipe.transformer, adapter_dir)
    finally:
        metrics.close()
    return {"output_dir": str(out), "adapter_dir": str(adapter_dir), "last": last, "steps": total - start}


def _record(accelerator, step: int, window: list[int], scores, adv, stats: dict[str, Any], ro: Rollout, lr: float,
            times: tuple[float, float, float]) -> dict[str, Any]:
    """The step's metrics line: rewards over every process's images, the GSPO statistics, timings."""
    comps = {k: _gather(accelerator, scores.components[k]) for k in COMPONENTS}
    rewards = _gather(accelerator, adv.reward.tolist())
    zero = _gather(accelerator, adv.zero_std.float().tolist())
    first = ("ratio_mean", "ratio_first", "clip_frac", "approx_kl")
    return {
        "step": step, "reward": _mean(rewards), **{f"reward_{k}": _mean(v) for k, v in comps.items()},
        "reward_std": float(np.std(rewards)) if rewards else None,
        **{k: stats[k] for k in first},
        "window_start": window[0], "window_end": window[-1] + 1,
        **{k: v for k, v in stats.items() if k not in first},
        "zero_std_frac": _mean(zero), "adv_abs_mean": float(adv.values.abs().mean()),
        "reward_failures": scores.failed, "reward_notes": len(scores.notes),
        "lr": lr, "nfe_per_image": ro.network_evals / ro.num_images,
        "time_rollout": times[0], "time_reward": times[1], "time_train": times[2],
    }


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Rows of `cols` images (one row per prompt group)."""
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def _gather(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float32, device=accelerator.device)
    return accelerator.gather(t).cpu().tolist()


def _mean(values: Sequence[float]) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    return training_parser("python -m train.ippo", __doc__.split("\n\n")[0],
                           "YAML config (train/configs/*_ippo.yaml)", "override train.output_dir")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, IPPOConfig, parse_set_overrides(args.set))
    result = train(cfg, args.output_dir, args.max_steps, args.resume)
    print(f"adapter: {result['adapter_dir']}")
    return 0


if __name__ == "__main__":
    run_cli(main)


__all__ = ["GSPOConfig", "IPPOConfig", "ModelConfig", "TrainConfig", "WindowConfig", "cached_groups", "main",
           "policy_update", "setup_adapter", "train"]
