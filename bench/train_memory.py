"""Training at FLUX.1-dev size on one GPU: seconds per step and peak memory of pre-training and IPPO per quantisation.

FLUX.1-dev-shaped models with RANDOM weights (bench/memory_modes.py builds them: no download; time and memory do not
depend on training), quantised as `model.quantize` does (none = bf16, int8 / fp8 torchao, nf4 bitsandbytes), trained
by the trainers themselves (`train.pretrain.Trainer`, `train.ippo.train`) with train/configs/flux_dev_adapter_24gb.yaml
and flux_dev_ippo_24gb.yaml: gradient checkpointing, LoRA + MoE-LoRA rank 128, the Dice loss on 2-subject ToyWorld
scenes rendered at 512 px with 320 px references. Differences from the configs, for a short run: one micro-batch per
optimizer step, and IPPO rolls out `--ippo-group` images of `--ippo-steps` steps (the configs: 12 of 16) with the
ToyWorld reward. Peak = torch.cuda.max_memory_allocated over the measured steps (IPPO: both iterations); pre-training reports the median
seconds per optimizer step after a warm-up step, IPPO the second iteration's rollout + update seconds.
    python bench/train_memory.py --device cuda --out bench/results/train_memory.md [--modes none int8 fp8 nf4]
    python bench/train_memory.py --shapes tiny --device cpu --out /tmp/train.md     # tiny configs, end to end on CPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.measure import peak_memory  # noqa: E402
from bench.memory_modes import MODES, build_components, quantize  # noqa: E402
from multicrafter import MultiCrafterPipeline  # noqa: E402
from multicrafter.errors import UserError  # noqa: E402
from multicrafter.io import atomic_write_text  # noqa: E402
from multicrafter.memory import check_modes, weight_bytes  # noqa: E402
from multicrafter.references import ReferenceOptions  # noqa: E402
from train.config import load_config  # noqa: E402
from train.ippo import IPPOConfig  # noqa: E402
from train.ippo import train as ippo_train  # noqa: E402
from train.metrics_log import read_metrics  # noqa: E402
from train.pretrain import PretrainConfig, Trainer  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"


def _configs(shapes: str, mode: str, args: argparse.Namespace) -> tuple[PretrainConfig, IPPOConfig]:
    """The two training configs of one measured mode, shortened as the module docstring says."""
    if shapes == "tiny":
        pre = load_config(CONFIGS / "tiny_pretrain.yaml", PretrainConfig, {
            "model.quantize": mode, "model.gradient_checkpointing": True, "output.progress": False,
            "data.toyworld": {"n": 2, "subjects": [2]}, "data.caption_dropout": 0.0,
            "train.mixed_precision": "bf16"})    # as the FLUX config (IPPO: none), so both set-ups run in turn
        ippo = load_config(CONFIGS / "tiny_ippo.yaml", IPPOConfig, {
            "model.quantize": mode, "model.gradient_checkpointing": True, "train.sample_every": 0,
            "train.groups_per_step": 1, "sampling.group_size": args.ippo_group, "sampling.num_steps": args.ippo_steps})
        return pre, ippo
    world = {"n": 2, "size": 512, "ref_size": 320, "subjects": [2]}
    pre = load_config(CONFIGS / "flux_dev_adapter_24gb.yaml", PretrainConfig, {
        "model.quantize": mode, "data.dataset": None, "data.toyworld": world, "data.caption_dropout": 0.0,
        "train.gradient_accumulation_steps": 1, "output.progress": False})
    a = pre.adapter
    ippo = load_config(CONFIGS / "flux_dev_ippo_24gb.yaml", IPPOConfig, {
        "model.quantize": mode, "model.adapter": None, "model.lora_rank": a.lora_rank, "model.lora_alpha": a.lora_alpha,
        "model.moe": {"num_experts": a.moe.num_experts, "top_k": a.moe.top_k, "rank": a.moe.rank,
                      "alpha": a.moe.alpha, "blocks": a.moe.blocks, "num_blocks": a.moe.num_blocks},
        "prompts.dataset": None, "prompts.toyworld": world, "reward.kind": "toy",
        "sampling.group_size": args.ippo_group, "sampling.num_steps": args.ippo_steps,
        "window.max_start": None, "train.sample_every": 0})
    return pre, ippo


def _pipeline(shapes: str, mode: str, device: str) -> MultiCrafterPipeline:
    comps = build_components(shapes, device)
    quantize(comps, mode, device)
    pipe = MultiCrafterPipeline(**comps)
    if shapes == "flux":
        pipe.reference_options = ReferenceOptions(long_side_single=320, long_side_multi=320)
    return pipe.to(device)


def _fresh_accelerate() -> None:
    """Each trainer sets up accelerate for its own config (pre-training in bf16 autocast, IPPO without): the
    process-wide state the previous one left must go first."""
    AcceleratorState._reset_state(reset_partial_state=True)


def _free(cuda: bool) -> None:
    """Give back what the last measurement left, so the next one's peak is its own."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _gb(peak: float | None) -> float | None:
    return None if peak is None else peak / 2**30


def measure_pretrain(pipe: MultiCrafterPipeline, cfg: PretrainConfig, steps: int, device: str) -> dict[str, Any]:
    _fresh_accelerate()
    secs: list[float] = []
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out, Trainer(cfg, Path(out) / "run", pipe=pipe) as trainer:
        trainer.train_step()                                     # warm-up: kernels, allocator, cached data

        def timed_steps() -> None:
            for _ in range(steps):
                start = time.perf_counter()
                losses.append(trainer.train_step()["loss"])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                secs.append(time.perf_counter() - start)

        peak = peak_memory(timed_steps, device)
        adapter_mb = sum(p.numel() for p in trainer.params) * 4 / 2**20
    return dict(s_per_step=statistics.median(secs), peak_gb=_gb(peak), loss=losses[-1], adapter_mb=adapter_mb)


def measure_ippo(pipe: MultiCrafterPipeline, cfg: IPPOConfig, device: str) -> dict[str, Any]:
    _fresh_accelerate()
    with tempfile.TemporaryDirectory() as out:
        peak = peak_memory(lambda: ippo_train(cfg, output_dir=Path(out) / "run", max_steps=2, log=lambda _: None,
                                              pipe=pipe), device)
        second = read_metrics(Path(out) / "run")[-1]           # the first iteration warms up
    return dict(s_rollout=second["time_rollout"], s_update=second["time_train"], peak_gb=_gb(peak))


def run(args: argparse.Namespace, on_mode: Callable[[list[dict[str, Any]]], None] | None = None,
        ) -> list[dict[str, Any]]:
    """Every mode's rows; `on_mode(rows so far)` after each mode (the table is written as it grows)."""
    cuda = args.device.startswith("cuda")
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        try:
            check_modes(mode, cuda=cuda)
            if mode == "nf4" and args.shapes == "tiny":
                raise UserError("nf4 is measured at FLUX shapes only")
        except UserError as exc:
            rows.append(dict(mode=mode, refused=str(exc)))
            print(f"{mode}: refused: {exc}", flush=True)
            if on_mode is not None:
                on_mode(rows)
            continue
        pre_cfg, ippo_cfg = _configs(args.shapes, mode, args)
        pipe = _pipeline(args.shapes, mode, args.device)
        weights = weight_bytes(pipe.transformer) + weight_bytes(pipe.text_encoder_2)
        row = dict(mode=mode, weights_mb=weights / 2**20,
                   pretrain=measure_pretrain(pipe, pre_cfg, args.steps, args.device))
        del pipe
        _free(cuda)
        pipe = _pipeline(args.shapes, mode, args.device)       # a fresh base: IPPO adds its own adapter
        row["ippo"] = measure_ippo(pipe, ippo_cfg, args.device)
        rows.append(row)
        print(row, flush=True)
        if on_mode is not None:
            on_mode(rows)
        del pipe
        _free(cuda)
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"Training memory, {args.shapes} shapes (random weights), {args.device}; pre-training: median of "
            f"{args.steps} optimizer steps after a warm-up; IPPO: one iteration of {args.ippo_group} images x "
            f"{args.ippo_steps} steps after a warm-up iteration. Peak = torch.cuda.max_memory_allocated.\n\n"
            "| quantize | transformer+T5 weights MB | adapter MB (fp32) | pre-train s/step | pre-train peak GB | "
            "IPPO rollout s | IPPO update s | IPPO peak GB |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['mode']} | refused: {r['refused']} | - | - | - | - | - | - |")
            continue
        p, i = r["pretrain"], r["ippo"]
        lines.append(f"| {r['mode']} | {r['weights_mb']:.1f} | {p['adapter_mb']:.1f} | {p['s_per_step']:.3f} | "
                     f"{_fmt(p['peak_gb'])} | {i['s_rollout']:.2f} | {i['s_update']:.2f} | {_fmt(i['peak_gb'])} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=["flux", "tiny"], default="flux")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--steps", type=int, default=3, help="measured pre-training steps per mode")
    ap.add_argument("--ippo-group", type=int, default=4, help="images per IPPO group (the config: 12)")
    ap.add_argument("--ippo-steps", type=int, default=8, help="sampling steps per IPPO rollout (the config: 16)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="markdown table to write")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available (use --shapes tiny --device cpu)", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = table(run(args, on_mode=lambda rows: atomic_write_text(args.out, table(rows, args))), args)
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
