"""UNO's adapter at FLUX.1-dev size (GPU): a random UNO-format rank-512 LoRA, converted and run.

Builds a random FLUX.1-dev-sized transformer (19 double, 38 single blocks, hidden 3072, bf16), writes a random
UNO-format `dit_lora.safetensors` (rank 512, every key UNO ships), converts it with `multicrafter.convert_uno`,
loads it with `multicrafter.adapters.load_adapter`, and times the 512x512 forward with two 320x320 references
(1024 target + 2x400 reference + 512 text tokens) without and with the adapter. Medians of interleaved repeats.
    python bench/uno_flux.py --device cuda [--rank 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from diffusers import FluxTransformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.attention_capture import FLUX, inputs  # noqa: E402
from bench.measure import interleaved_medians, peak_memory  # noqa: E402
from multicrafter.adapters import load_adapter, set_adapter_enabled  # noqa: E402
from multicrafter.convert_uno import convert  # noqa: E402


def random_uno_lora(rank: int, n_double: int = 19, n_single: int = 38, dim: int = 3072, mlp: int = 12288):
    g = torch.Generator().manual_seed(0)
    sd = {}

    def pair(prefix, fin, fout):
        sd[f"{prefix}.down.weight"] = (torch.randn(rank, fin, generator=g) / fin**0.5).to(torch.bfloat16)
        sd[f"{prefix}.up.weight"] = (torch.randn(fout, rank, generator=g) * 1e-3).to(torch.bfloat16)

    for i in range(n_double):
        pair(f"double_blocks.{i}.processor.qkv_lora1", dim, 3 * dim)
        pair(f"double_blocks.{i}.processor.proj_lora1", dim, dim)
        pair(f"double_blocks.{i}.processor.qkv_lora2", dim, 3 * dim)
        pair(f"double_blocks.{i}.processor.proj_lora2", dim, dim)
    for i in range(n_single):
        pair(f"single_blocks.{i}.processor.qkv_lora", dim, 3 * dim)
        pair(f"single_blocks.{i}.processor.proj_lora", dim + mlp, dim)
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = FluxTransformer2DModel(**FLUX).to(torch.bfloat16).eval().requires_grad_(False)
    print(f"built FLUX.1-dev-sized transformer ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) "
          f"in {time.perf_counter() - t0:.1f} s")
    kw, layout, _ = inputs(True, args.device, torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        uno = random_uno_lora(args.rank)
        save_file(uno, f"{tmp}/dit_lora.safetensors")
        n_lora = sum(t.numel() for t in uno.values())
        del uno
        t1 = time.perf_counter()
        convert(f"{tmp}/dit_lora.safetensors", f"{tmp}/uno_adapter", model)
        t2 = time.perf_counter()
        load_adapter(model, f"{tmp}/uno_adapter")
        t3 = time.perf_counter()
    print(f"UNO LoRA rank {args.rank}: {n_lora / 1e6:.0f} M params; write {t1 - t0:.1f} s, convert {t2 - t1:.1f} s, "
          f"load {t3 - t2:.1f} s")

    def fwd():
        with torch.no_grad():
            model(**kw, return_dict=False)

    def base():
        set_adapter_enabled(model, False)
        fwd()

    def uno():
        set_adapter_enabled(model, True)
        fwd()

    med = interleaved_medians({"base": base, "uno": uno}, args.repeats)
    set_adapter_enabled(model, False)
    mem_base = peak_memory(fwd, args.device)
    set_adapter_enabled(model, True)
    mem_uno = peak_memory(fwd, args.device)
    print(f"tokens: {layout.n_text} text + {layout.n_target} target + {sum(layout.ref_lengths)} reference")
    print("| model | forward (s, median) | peak allocated (GiB) |\n|---|---|---|")
    print(f"| FLUX.1-dev-size, no adapter | {med['base']:.3f} | {mem_base / 2**30:.1f} |")
    print(f"| + converted UNO LoRA r{args.rank} | {med['uno']:.3f} | {mem_uno / 2**30:.1f} |")
    print(f"ratio uno/base: time {med['uno'] / med['base']:.3f}, memory {mem_uno / mem_base:.3f}")
    print(f"20-step generation estimate (transformer only): {20 * med['uno']:.1f} s")


if __name__ == "__main__":
    main()
