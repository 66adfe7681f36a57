"""Train the toy model's VAE on ToyWorld: `python -m train.vae --config train/configs/recipe/vae.yaml [--resume]`.

FLUX ships its VAE; the offline toy model needs its own. This is a small diffusers AutoencoderKL (16 latent channels,
like FLUX's, so the transformer's 2x2 packing and 64 input channels are the same) trained with L1 + MSE + a small
KL term on random crops of ToyWorld scenes and references. At the end the latent shift and scale are estimated from
data (FLUX's `shift_factor` / `scaling_factor`: latents are normalised to zero mean and unit variance) and the VAE is
saved with `save_pretrained`. Checkpoints are atomic and `--resume` continues bit-exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from multicrafter.errors import ArgumentParser, UserError, run_cli
from multicrafter.io import staged_dir
from multicrafter.toyworld.make_dataset import build_sample

from .checkpoints import (
    capture_rng_state,
    checkpoint_step,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from .config import load_config
from .metrics_log import LogSchedule, MetricsLogger
from .optim import OptimConfig, build_optimizer
from .run_lock import RunLock


@dataclass
class VAEModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])   # 3 blocks: x4 downsampling
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_num_groups: int = 16


@dataclass
class VAEDataConfig:
    seed: int = 0
    scene_size: int = 128
    ref_size: int = 64
    crop: int = 64            # training crop size (scenes are cropped, references used whole)
    ref_fraction: float = 0.25


@dataclass
class VAETrainConfig:
    output_dir: str = "runs/toy_vae"
    steps: int = 4000
    batch_size: int = 32
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    l1_weight: float = 1.0
    checkpoint_every: int = 250
    keep_last: int = 2
    log_every: int = 10
    threads: int = 2
    stats_samples: int = 256   # scenes used to estimate shift/scale at the end
    num_workers: int = 0       # processes rendering batches (batches are a pure function of the step: still exact)
    device: str = "auto"       # auto (cuda when available) | cpu | cuda


@dataclass
class VAEConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine",
                                                                   min_lr_ratio=0.05))


def build_vae(cfg: VAEModelConfig):
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels), norm_num_groups=cfg.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def batch_at(step: int, cfg: VAEConfig) -> torch.Tensor:
    """The training batch of a step: a pure function of (seed, step), so resuming needs no data state."""
    d, bs = cfg.data, cfg.train.batch_size
    rng = np.random.default_rng(np.random.SeedSequence([d.seed, 7, step]))
    crops = []
    for k in range(bs):
        sample = build_sample(d.seed, step * bs + k, split="train", size=d.scene_size, ref_size=d.ref_size)
        if rng.random() < d.ref_fraction:
            img = sample.references[int(rng.integers(len(sample.references)))]
            if img.shape[0] != d.crop:
                img = np.asarray(torch.nn.functional.interpolate(
                    torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(d.crop, d.crop), mode="area"
                )[0].permute(1, 2, 0).round().byte())
        else:
            y, x = (int(v) for v in rng.integers(0, d.scene_size - d.crop + 1, size=2))
            img = sample.image[y:y + d.crop, x:x + d.crop]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        crops.append(np.ascontiguousarray(img))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x


class _StepBatches(torch.utils.data.Dataset):
    """Batches by step index, so DataLoader workers can render them in parallel without changing the result."""

    def __init__(self, cfg: VAEConfig, start: int, end: int):
        self.cfg, self.start, self.end = cfg, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        return batch_at(self.start + i, self.cfg)


def vae_loss(vae, x: torch.Tensor, cfg: VAETrainConfig) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
    kl = posterior.kl().mean()
    loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    psnr = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))   # images in [-1, 1]: peak-to-peak 2
    return loss, {k: float(v.detach()) for k, v in (("l1", l1), ("mse", mse), ("kl", kl), ("psnr", psnr))}


@torch.no_grad()
def latent_statistics(vae, cfg: VAEConfig) -> tuple[float, float]:
    """FLUX-style normalisation constants: (shift, scale) with scale = 1 / std of the shifted latents."""
    zs = []
    for i in range(cfg.train.stats_samples):
        s = build_sample(cfg.data.seed + 1, i, split="train", size=cfg.data.scene_size, ref_size=cfg.data.ref_size)
        x = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        zs.append(vae.encode(x.to(vae.device)).latent_dist.mode().flatten().cpu())
    z = torch.cat(zs)
    return float(z.mean()), float(1.0 / z.std())


def save_vae(vae, target: Path) -> Path:
    """`save_pretrained` into a temp sibling folder swapped in at the end: `target` is never a half-written VAE."""
    with staged_dir(target) as tmp:
        vae.save_pretrained(tmp)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m train.vae", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this step (a checkpoint is written)")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--finalize", action="store_true",
                    help="with --resume: save the VAE (with data-estimated shift/scale) from the latest checkpoint now")
    args = ap.parse_args(argv)
    if args.finalize and not args.resume:
        raise UserError("--finalize needs --resume (it finalizes the latest checkpoint)")
    cfg = load_config(args.config, VAEConfig)
    out = Path(args.output_dir or cfg.train.output_dir)
    with RunLock(out):   # before anything is written there
        train(cfg, out, args.max_steps, args.resume, args.finalize)
    return 0


def train(cfg: VAEConfig, out: Path, max_steps: int | None, resume: bool, finalize: bool) -> None:
    """Train to `max_steps` (default train.steps); at the end (or with `finalize`) save OUT/vae."""
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.data.seed)
    device = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    vae = build_vae(cfg.model).to(device).train()
    opt, sched = build_optimizer(list(vae.parameters()), cfg.optim, cfg.train.steps)
    start = 0
    ckpt = resolve_resume(out, resume)
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        vae.load_state_dict({k: v.to(device) for k, v in state["vae"].items()})
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start = checkpoint_step(ckpt)
        print(f"resumed from {ckpt} (step {start})")
    end = start if finalize else min(cfg.train.steps, max_steps or cfg.train.steps)
    schedule = LogSchedule(cfg.train.log_every, cfg.train.steps, end)
    logger = MetricsLogger(out, resume_step=start if ckpt is not None else None, keep=schedule.due)
    # Its own generator: creating the iterator draws a seed, which must not come from the global RNG just restored
    # (the posterior samples use that one), or a resumed run would differ from an uninterrupted one.
    loader = torch.utils.data.DataLoader(_StepBatches(cfg, start, end), batch_size=None, shuffle=False,
                                         num_workers=cfg.train.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.data.seed))
    bar = tqdm(zip(range(start, end), loader), initial=start, total=end, desc="vae", dynamic_ncols=True)
    t0 = time.perf_counter()
    with logger:
        for step, x in bar:
            x = x.to(device)
            loss, parts = vae_loss(vae, x, cfg.train)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.optim.max_grad_norm)
            opt.step()
            sched.step()
            if schedule.due(step + 1):
                logger.log({"step": step + 1, "loss": float(loss.detach()), **parts, "grad_norm": float(gn),
                            "lr": sched.get_last_lr()[0],
                            "sec_per_step": (time.perf_counter() - t0) / (step + 1 - start)})
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", psnr=f"{parts['psnr']:.1f}")
            if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == end:
                save_checkpoint(out, step + 1, {"vae": vae.state_dict(), "optimizer": opt.state_dict(),
                                                "scheduler": sched.state_dict(), "rng": capture_rng_state()},
                                keep_last=cfg.train.keep_last)
    if end >= cfg.train.steps or finalize:
        vae.eval()
        shift, scale = latent_statistics(vae, cfg)
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        save_vae(vae.to("cpu"), out / "vae")
        print(f"saved {out / 'vae'} (shift_factor {shift:.4f}, scaling_factor {scale:.4f})")


if __name__ == "__main__":
    run_cli(main)
