"""Memory modes at FLUX.1-dev size (GPU): peak memory and seconds per step of each quantisation x offload mode.

Builds FLUX.1-dev's transformer (19 double, 38 single blocks, hidden 3072; bench/attention_capture.py's FLUX config)
and T5-XXL (config below) with RANDOM weights (no download; speed and memory do not depend on training), plus CLIP-L
and FLUX's VAE.
For each mode (quantize none bf16 / int8 / fp8 / nf4, each with offload none / model) and each size it runs
MultiCrafterPipeline with 2 references, attention capture off and on, then with the 24 GB training config's adapter
(LoRA + MoE-LoRA rank 128, random weights), and stock FluxPipeline (no references) on the same components, and reports peak GPU memory (torch.cuda.max_memory_allocated over the call) and the median seconds
per denoising step. Modes the device cannot run are listed as refused, with the reason.
    python bench/memory_modes.py --device cuda --out bench/results/memory_modes.md [--sizes 512 1024] [--steps 4]
    python bench/memory_modes.py --shapes tiny --device cpu --out /tmp/modes.md    # tiny shapes, end to end on CPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

from bench.attention_capture import FLUX  # noqa: E402
from bench.measure import peak_memory  # noqa: E402
from multicrafter import MultiCrafterPipeline  # noqa: E402
from multicrafter.adapters import AdapterConfig, adapter_parameters, add_adapter, fuse_lora  # noqa: E402
from multicrafter.errors import UserError  # noqa: E402
from multicrafter.io import atomic_write_text  # noqa: E402
from multicrafter.memory import apply_offload, check_modes, quantize_in_place, weight_bytes  # noqa: E402
from multicrafter.moe_lora import MoELoRAConfig  # noqa: E402
from multicrafter.presets import FLUX_SCHEDULER, build_tiny_components, load_tokenizers  # noqa: E402
from multicrafter.references import ReferenceOptions  # noqa: E402

# black-forest-labs/FLUX.1-dev text_encoder_2/config.json (T5 v1.1 XXL encoder)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
# text_encoder/config.json (CLIP ViT-L/14 text tower)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu")
# vae/config.json
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)

MODES = ("none", "int8", "fp8", "nf4")
OFFLOADS = ("none", "model")


def _random_fill(module: nn.Module, seed: int) -> nn.Module:
    """Random weights in place, fast on any device (normal, std 1/sqrt(fan-in)); norms at 1."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=g)
            elif "norm" in name or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module


def _build_big(cls: Any, config: Any, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """A model allocated straight on `device` (no CPU init of billions of weights), randomly filled."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    model = model.to_empty(device=device).to(dtype)   # neither model has buffers to restore after to_empty
    return _random_fill(model, seed).eval().requires_grad_(False)


def build_components(shapes: str, device: str) -> dict[str, Any]:
    """FluxPipeline's seven components: FLUX.1-dev shapes (bf16, on `device`) or the tiny test model (CPU)."""
    if shapes == "tiny":
        return build_tiny_components()
    dtype = torch.bfloat16
    tokenizer, tokenizer_2 = load_tokenizers()   # ids stay within the real vocabularies
    transformer = _build_big(FluxTransformer2DModel, FLUX, device, dtype, 0)   # FLUX.1-dev's transformer config
    text_encoder_2 = _build_big(T5EncoderModel, T5Config(**T5_XXL), device, dtype, 1)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)).to(device, dtype).eval()
    vae = AutoencoderKL(**FLUX_VAE).to(device, dtype).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER))


def nf4_in_place(module: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """bitsandbytes 4-bit NF4 linears in place of a built model's linears (what NF4 loading gives)."""
    import bitsandbytes as bnb

    for name, lin in list(module.named_modules()):
        if not isinstance(lin, nn.Linear) or lin.in_features < 64:
            continue
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, q.to(lin.weight.device))


def quantize(comps: dict[str, Any], mode: str, device: str) -> None:
    """Quantise transformer and T5 of built components as `from_pretrained(quantize=mode)` does when loading."""
    holder = argparse.Namespace(**comps)
    if mode == "nf4":
        for name in ("transformer", "text_encoder_2"):
            nf4_in_place(comps[name])
    else:
        quantize_in_place(holder, mode)


def add_random_adapter(transformer: nn.Module, shapes: str) -> None:
    """The adapter of train/configs/flux_dev_adapter_24gb.yaml (tiny shapes: rank 4) with random non-zero weights."""
    rank = 128 if shapes == "flux" else 4
    moe = MoELoRAConfig(num_experts=4, top_k=1, rank=rank, alpha=float(rank), blocks="single",
                        num_blocks=8 if shapes == "flux" else 1)
    add_adapter(transformer, AdapterConfig(lora_rank=rank, lora_alpha=float(rank), moe=moe))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(transformer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    transformer.requires_grad_(False)


def measure(pipe: Any, device: str, call: dict[str, Any]) -> tuple[float | None, float]:
    """(peak GPU bytes over one call or None on CPU, median seconds per denoising step)."""
    stamps: list[float] = []

    def callback(pipe, i, t, kw):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kw

    def generate() -> None:
        stamps.append(time.perf_counter())
        pipe(**call, callback_on_step_end=callback, generator=torch.Generator().manual_seed(0), output_type="pil")

    peak = peak_memory(generate, device)
    steps = np.diff(stamps)
    steps = steps[1:] if len(steps) > 1 else steps   # the first step also encodes the prompt and references
    return peak, float(statistics.median(steps.tolist()))


def measure_mode(args: argparse.Namespace, mode: str, offload: str, refs: list[Image.Image],
                 ref_px: int) -> list[dict[str, Any]]:
    """Every case of one quantize x offload mode at every size: stock, ours with references (capture off, on), and
    ours with an adapter."""
    cuda = args.device.startswith("cuda")
    build_on = "cpu" if offload != "none" or not cuda else args.device
    comps = build_components(args.shapes, build_on)
    quantize(comps, mode, build_on)
    weights = weight_bytes(comps["transformer"]) + weight_bytes(comps["text_encoder_2"])
    ours = MultiCrafterPipeline(**comps)
    ours.reference_options = ReferenceOptions(long_side_single=ref_px, long_side_multi=ref_px)
    stock = FluxPipeline(**comps)
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
        if offload == "none":
            p.to(args.device)
        else:
            apply_offload(p, offload)
    rows: list[dict[str, Any]] = []
    stock_steps: dict[int, float] = {}

    def record(label: str, pipe: Any, kw: dict[str, Any], size: int) -> None:
        measure(pipe, args.device, dict(kw, num_inference_steps=1))   # warm-up
        peak, step = measure(pipe, args.device, kw)
        stock_steps.setdefault(size, step)                            # the first case of each size is stock
        row = dict(mode=mode, offload=offload, size=size, run=label, peak_gb=None if peak is None
                   else peak / 2**30, s_per_step=step, x_stock=step / stock_steps[size], weights_mb=weights / 2**20)
        rows.append(row)
        print(row, flush=True)

    calls = {size: dict(prompt="a dog and a cat on a sofa", height=size, width=size, num_inference_steps=args.steps,
                        guidance_scale=3.5, max_sequence_length=args.max_seq) for size in args.sizes}
    for size, call in calls.items():
        record("stock FluxPipeline", stock, call, size)
        record("ours, 2 refs", ours, dict(call, reference_images=refs), size)
        record("ours, 2 refs + attention", ours, dict(call, reference_images=refs, return_attention=True), size)
    # Last, since stock FluxPipeline shares the transformer: the adapter the 24 GB training config trains
    # (LoRA + MoE-LoRA, random non-zero weights), fused where the base allows it, as inference loads it.
    add_random_adapter(comps["transformer"], args.shapes)
    fuse_lora(comps["transformer"])
    for size, call in calls.items():
        record("ours, 2 refs + adapter", ours, dict(call, reference_images=refs), size)
    return rows


def run(args: argparse.Namespace, on_mode: Callable[[list[dict[str, Any]]], None] | None = None,
        ) -> list[dict[str, Any]]:
    """Every mode's rows; `on_mode(rows so far)` after each mode (the table is written as it grows)."""
    cuda = args.device.startswith("cuda")
    rng = np.random.default_rng(0)
    ref_px = 64 if args.shapes == "tiny" else 320
    refs = [Image.fromarray(rng.integers(0, 255, (ref_px, ref_px, 3), dtype=np.uint8)) for _ in range(2)]
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        for offload in args.offloads:
            try:
                check_modes(mode, offload, cuda=cuda)
                if mode == "nf4" and args.shapes == "tiny":
                    raise UserError("nf4 is measured at FLUX shapes only")
            except UserError as exc:
                rows.append(dict(mode=mode, offload=offload, refused=str(exc)))
                print(f"{mode}/{offload}: refused: {exc}", flush=True)
            else:
                rows += measure_mode(args, mode, offload, refs, ref_px)
            if on_mode is not None:
                on_mode(rows)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"Memory modes, {args.shapes} shapes (random weights), {args.device}, {args.steps} steps, 2 references; "
            "peak = torch.cuda.max_memory_allocated over one call; s/step = median per denoising step.\n\n"
            "| quantize | offload | size | run | transformer+T5 weights MB | peak GB | s/step | x stock |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['mode']} | {r['offload']} | - | refused: {r['refused']} | - | - | - | - |")
        else:
            peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
            lines.append(f"| {r['mode']} | {r['offload']} | {r['size']} | {r['run']} | {r['weights_mb']:.1f} | "
                         f"{peak} | {r['s_per_step']:.4f} | {r['x_stock']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=["flux", "tiny"], default="flux")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="default 512 1024 (flux), 64 (tiny)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--offloads", nargs="+", choices=OFFLOADS, default=list(OFFLOADS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-seq", type=int, default=None, help="T5 tokens (default 512 flux, 16 tiny)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="markdown table to write")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sizes = args.sizes or ([512, 1024] if args.shapes == "flux" else [64])
    args.max_seq = args.max_seq or (512 if args.shapes == "flux" else 16)
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
