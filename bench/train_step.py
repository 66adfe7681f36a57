"""Pre-training step time: adapter with L_attn vs L_diff only, and MoE-LoRA vs plain LoRA of the same rank.

All four trainers use the same random FLUX-architecture model (hidden 192 = 4 heads x 48, 3 double + 3 single
blocks), the same cached ToyWorld batch layout (256 target tokens, two 64-token references) and run interleaved in
one process, so drift hits every configuration alike. Targets: attn / diff <= 1.25, MoE / LoRA <= 1.15. Wall-clock
medians and process CPU-time medians are both reported: on a shared CPU the wall clock mostly measures the neighbours.

    python bench/train_step.py [--repeats 15] [--threads 2] [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import interleaved_medians  # noqa: E402
from multicrafter.adapters import DEFAULT_LORA_TARGETS  # noqa: E402
from train.config import load_config  # noqa: E402
from train.pretrain import PretrainConfig, Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "tiny_pretrain.yaml"
MODEL = {"num_layers": 3, "num_single_layers": 3, "attention_head_dim": 48, "num_attention_heads": 4,
         "axes_dims_rope": [8, 20, 20]}
SINGLE_FFN = r"^single_transformer_blocks\.(0|1|2)\.(proj_mlp|proj_out)$"


def make_trainer(out: Path, world: Path, args, **over) -> Trainer:
    base = {
        "model.init_transformer": MODEL, "model.gradient_checkpointing": args.checkpointing,
        "data.toyworld": {"n": 2 * args.batch, "size": 256, "ref_size": 64, "subjects": [2], "folder": str(world)},
        "data.resolution": 256, "data.ref_long_side_multi": 128, "data.batch_size": args.batch,
        "data.caption_dropout": 0.0, "adapter.lora_rank": args.rank, "adapter.lora_alpha": float(args.rank),
        "adapter.moe.rank": args.rank, "adapter.moe.alpha": float(args.rank), "adapter.moe.num_blocks": 3,
        "adapter.moe.load_balance_weight": 0.0, "attention_loss.weight": 0.0, "output.progress": False,
        "train.mixed_precision": args.mixed_precision,
    }
    base.update(over)
    return Trainer(load_config(CONFIG, PretrainConfig, base), out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = tmp / "world"
        trainers = {
            "lora_diff": make_trainer(tmp / "a", world, args, **{"adapter.type": "lora"}),
            "lora_diff+attn": make_trainer(tmp / "b", world, args, **{"adapter.type": "lora",
                                                                       "attention_loss.weight": 0.1}),
            "lora_attn+lora_ffn": make_trainer(tmp / "c", world, args, **{
                "adapter.type": "lora", "adapter.lora_targets": f"{DEFAULT_LORA_TARGETS}|{SINGLE_FFN}"}),
            "lora_attn+moe_ffn": make_trainer(tmp / "d", world, args, **{"adapter.type": "moe_lora"}),
        }
        t0 = trainers["lora_diff"]
        n_params = sum(p.numel() for p in t0.transformer.parameters() if not p.requires_grad)
        batch = t0.data.collate(t0.order.next(), t0.pipe, t0.device, t0.dtype, torch.Generator())
        tokens = (batch["latents"].shape[1], batch["refs"].lengths, batch["prompt_embeds"].shape[1])
        trainable = {k: sum(p.numel() for p in t.params) for k, t in trainers.items()}
        cpu: dict[str, list[float]] = {k: [] for k in trainers}

        def timed(name: str, t: Trainer):
            def fn() -> None:
                c = time.process_time()
                t.train_step()
                cpu[name].append(time.process_time() - c)
            return fn

        med = interleaved_medians({k: timed(k, t) for k, t in trainers.items()}, args.repeats, warmup=2)
        cpu_med = {k: statistics.median(v[2:]) for k, v in cpu.items()}  # the 2 warm-up calls are dropped
    res = {
        "device": str(t0.device), "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
        "base_params": n_params, "tokens_target_refs_text": tokens, "trainable_params": trainable,
        "median_wall_s": med, "median_cpu_s": cpu_med,
        "ratio_attn_vs_diff": med["lora_diff+attn"] / med["lora_diff"],
        "ratio_moe_vs_lora_same_rank": med["lora_attn+moe_ffn"] / med["lora_attn+lora_ffn"],
        "cpu_ratio_attn_vs_diff": cpu_med["lora_diff+attn"] / cpu_med["lora_diff"],
        "cpu_ratio_moe_vs_lora_same_rank": cpu_med["lora_attn+moe_ffn"] / cpu_med["lora_attn+lora_ffn"],
    }
    print(json.dumps(res, indent=2))
    for kind, pre in (("wall", ""), ("process CPU", "cpu_")):
        print(f"{kind}: L_attn overhead {res[pre + 'ratio_attn_vs_diff']:.3f}x (target <= 1.25); MoE-LoRA vs LoRA "
              f"rank {args.rank}: {res[pre + 'ratio_moe_vs_lora_same_rank']:.3f}x (target <= 1.15)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
