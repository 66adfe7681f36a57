"""MoE-LoRA layer cost vs a plain LoRA of the same rank: forward+backward median time per implementation.

    python bench/moe_lora_speed.py [--tokens 1024] [--repeats 15] [--threads 1] [--device cpu] [--step]

Prints one row per (in, out, rank): base only, LoRA, MoE dense, MoE grouped, and the ratios to LoRA. The numbers
chose `MoELoRALinear._use_dense` (the "auto" rule). Timings are medians of `--repeats` runs after warm-up, the
variants run round-robin. `--step` adds a whole-model forward+backward on a ~5.5 M-parameter FLUX-architecture
transformer: attention LoRA + LoRA on the last two single blocks' FFN linears vs attention LoRA + MoE-LoRA there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from diffusers import FluxTransformer2DModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402

from multicrafter.adapters import DEFAULT_LORA_TARGETS, AdapterConfig, adapter_parameters, add_adapter  # noqa: E402
from multicrafter.moe_lora import MoELoRAConfig, MoELoRALinear  # noqa: E402


def peft_lora(base: nn.Linear, rank: int) -> nn.Module:
    """The LoRA the adapter really uses: a peft LoRA Linear of the same rank (dropout 0, non-zero B)."""
    mod = LoraLinear(base, "default", config=LoraConfig(r=rank, lora_alpha=rank), r=rank, lora_alpha=rank)
    nn.init.normal_(mod.lora_B["default"].weight, std=0.01)
    return mod


def time_fb(variants: dict, x: torch.Tensor, repeats: int, sync) -> dict[str, float]:
    """Median fwd+bwd ms per variant; variants run round-robin so load from other processes hits all alike."""
    def step(fn):
        x.grad = None
        fn(x).square().mean().backward()
        sync()

    for fn in variants.values():
        for _ in range(2):
            step(fn)
    ts = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            step(fn)
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shapes", default="192x768,768x3072,3072x768", help="comma-separated INxOUT")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--step", action="store_true", help="also time a whole-model step (LoRA vs MoE-LoRA)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"tokens={args.tokens} threads={args.threads} device={dev} dtype={args.dtype}, fwd+bwd median ms")
    print(f"{'in':>5} {'out':>5} {'r':>4} {'base':>8} {'lora':>8} {'dense':>8} {'grouped':>8} "
          f"{'auto':>6} {'dense/lora':>10} {'grp/lora':>9}")
    for shape in args.shapes.split(","):
        fin, fout = (int(v) for v in shape.split("x"))
        for r in (int(v) for v in args.ranks.split(",")):
            torch.manual_seed(0)
            base = nn.Linear(fin, fout).to(dev, dtype).requires_grad_(False)
            x = torch.randn(args.tokens, fin, device=dev, dtype=dtype, requires_grad=True)
            lora = peft_lora(base, r).to(dev, dtype)
            moe = MoELoRALinear(base, num_experts=4, top_k=1, rank=r, alpha=r).to(dev, dtype)
            nn.init.normal_(moe.expert_B, std=0.01)
            dense = MoELoRALinear(base, num_experts=4, top_k=1, rank=r, alpha=r, impl="dense").to(dev, dtype)
            dense.load_state_dict(moe.state_dict())
            moe.impl = "grouped"
            t = time_fb({"base": base, "lora": lora, "dense": dense, "grouped": moe}, x, args.repeats, sync)
            moe.impl = "auto"
            auto = "dense" if moe._use_dense(dev) else "grouped"
            print(f"{fin:>5} {fout:>5} {r:>4} {t['base']:8.2f} {t['lora']:8.2f} {t['dense']:8.2f} "
                  f"{t['grouped']:8.2f} {auto:>6} {t['dense'] / t['lora']:10.3f} {t['grouped'] / t['lora']:9.3f}")
    if args.step:
        for r in (int(v) for v in args.ranks.split(",")):
            step_ratio(r, args.repeats, dev, dtype, sync)


def step_ratio(rank: int, repeats: int, dev, dtype, sync) -> None:
    """Same model, same rank: FFN linears of the output-side single blocks carry LoRA or MoE-LoRA (4 experts, top-1)."""
    def model():
        torch.manual_seed(0)
        return FluxTransformer2DModel(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
                                      num_attention_heads=6, joint_attention_dim=64, pooled_projection_dim=64,
                                      guidance_embeds=True, axes_dims_rope=(8, 12, 12)).to(dev).train()

    ffn = r"single_transformer_blocks\.(2|3)\.(proj_mlp|proj_out)"
    variants = {"lora": model(), "moe": model()}
    if dtype != torch.float32:
        variants = {k: m.to(dtype) for k, m in variants.items()}
    add_adapter(variants["lora"], AdapterConfig(lora_rank=rank, lora_targets=DEFAULT_LORA_TARGETS[:-2] + "|" + ffn + ")$"))
    add_adapter(variants["moe"], AdapterConfig(lora_rank=rank, moe=MoELoRAConfig(rank=rank, num_blocks=2)))
    for m in variants.values():
        with torch.no_grad():
            for p in adapter_parameters(m):
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 2 * 256 + 2 * 100, 64  # 512² target + two 320² references at /16, like the paper's setting
    inputs = dict(hidden_states=torch.randn(2, n_img, 64, generator=g), encoder_hidden_states=torch.randn(2, n_txt, 64,
                  generator=g), pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.tensor([0.5, 0.7]),
                  guidance=torch.tensor([3.5, 3.5]), img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3))
    inputs = {k: v.to(dev, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else None)
              for k, v in inputs.items()}

    def step(m):
        m.zero_grad(set_to_none=True)
        m(**inputs, return_dict=False)[0].float().square().mean().backward()
        sync()

    for m in variants.values():
        step(m)
    ts = {k: [] for k in variants}
    for _ in range(max(3, repeats // 2)):
        for k, m in variants.items():
            t0 = time.perf_counter()
            step(m)
            ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    print(f"model step, rank {rank}: LoRA {med['lora']:.1f} ms, MoE-LoRA {med['moe']:.1f} ms, "
          f"ratio {med['moe'] / med['lora']:.3f}")


if __name__ == "__main__":
    main()
