"""Generation speed of the toy-sized model on CPU: MultiCrafter with 2 references vs stock FluxPipeline, 20 steps.

Uses the toy architecture (5.9 M-parameter transformer: hidden 192, 3 double + 3 single blocks; the committed toy
VAE; the tiny text encoders) with random transformer weights (speed does not depend on training), 128x128 output,
two 64x64 references. Rows: stock FluxPipeline (no references), ours without references, ours with 2 references,
ours with 2 references + attention capture. Medians over interleaved repeats; ratios against stock.
    python bench/generate_speed.py [--repeats 5] [--steps 20] [--threads 2] [--toy]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: E402

from bench.measure import interleaved_medians  # noqa: E402
from multicrafter import MultiCrafterPipeline  # noqa: E402
from multicrafter.adapters import lora_fused, unfuse_lora  # noqa: E402
from multicrafter.moe_lora import moe_modules  # noqa: E402
from multicrafter.presets import REPO_ROOT, build_tiny_components  # noqa: E402
from multicrafter.references import ReferenceOptions  # noqa: E402


def toy_sized_pipeline():
    """The toy architecture with random transformer weights, as (MultiCrafterPipeline, stock FluxPipeline)."""
    comps = build_tiny_components()
    torch.manual_seed(0)
    comps["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=3, num_single_layers=3, attention_head_dim=48, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 20, 20)).eval()
    comps["vae"] = AutoencoderKL.from_pretrained(REPO_ROOT / "multicrafter" / "assets" / "toy_vae").eval()
    ours = MultiCrafterPipeline(**comps)
    ours.reference_options = ReferenceOptions(long_side_single=64, long_side_multi=64)
    for p in (ours,):
        p.set_progress_bar_config(disable=True)
    stock = FluxPipeline(**comps)
    stock.set_progress_bar_config(disable=True)
    return ours, stock


def shipped_toy_pipelines():
    """The shipped toy model (trained weights), stock FluxPipeline over the same modules, and the toy as the app
    loads it, with its default adapter (`ippo`: LoRA on attention + MoE-LoRA on the single blocks; the LoRA fused
    into the base weights) as a second pipeline, the same with the LoRA unfused as a third, and the same with the
    MoE-LoRA experts computed as low-rank updates instead of merged into per-expert weights as a fourth (None when
    the toy's default is the base alone)."""
    ours = MultiCrafterPipeline.from_pretrained("toy", adapter=False)
    stock = FluxPipeline(**{k: v for k, v in ours.components.items() if k in FluxPipeline._get_signature_keys(
        FluxPipeline)[0]})
    adapted = MultiCrafterPipeline.from_pretrained("toy")                 # the manifest's default adapter (fused)
    adapted = adapted if adapted.adapter_name else None
    unfused = None
    if adapted is not None and lora_fused(adapted.transformer):          # the same adapter with its LoRA unfused
        unfused = MultiCrafterPipeline.from_pretrained("toy")
        unfuse_lora(unfused.transformer)
    unmerged = None
    if adapted is not None and moe_modules(adapted.transformer):      # experts as rank-r updates (GPU's path)
        unmerged = MultiCrafterPipeline.from_pretrained("toy")
        for m in moe_modules(unmerged.transformer).values():
            m.merge_experts = False
    for p in (ours, stock, adapted, unfused, unmerged):
        if p is not None:
            p.set_progress_bar_config(disable=True)
    return ours, stock, adapted, unfused, unmerged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--toy", action="store_true",
                    help="the shipped toy model (multicrafter/assets/toy) instead of random weights, plus a row with its default adapter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapted = unfused = unmerged = None
    if args.toy:
        ours, stock, adapted, unfused, unmerged = shipped_toy_pipelines()
    else:
        ours, stock = toy_sized_pipeline()
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    kw = dict(prompt="a red striped circle on the left and a blue dotted square on the right, on a plain grey "
              "background", height=128, width=128, num_inference_steps=args.steps, max_sequence_length=64)
    # Every pipeline samples the same way: the toy's own defaults (guidance 1.0, true CFG 3 against the empty prompt,
    # i.e. two transformer calls per step) are passed to stock FluxPipeline too.
    cfg = {k: v for k, v in ours.sampling_defaults.items() if k in ("guidance_scale", "true_cfg_scale",
                                                                     "negative_prompt")}
    kw.update(cfg)

    def gen(pipe, **extra):
        return lambda: pipe(generator=torch.Generator().manual_seed(0), **{**kw, **extra})

    runs = {"stock FluxPipeline": gen(stock), "ours, no references": gen(ours),
            "ours, 2 references": gen(ours, reference_images=refs),
            "ours, 2 references + attention": gen(ours, reference_images=refs, return_attention=True)}
    if cfg.get("true_cfg_scale", 1.0) > 1:
        runs["ours, 2 references, true CFG off"] = gen(ours, reference_images=refs, true_cfg_scale=1.0)
    if adapted is not None:
        runs[f"ours, 2 references, {adapted.adapter_name} adapter (the default)"] = gen(adapted, reference_images=refs)
    if unfused is not None:
        runs[f"ours, 2 references, {unfused.adapter_name} adapter, LoRA unfused"] = gen(unfused, reference_images=refs)
    if unmerged is not None:
        runs[f"ours, 2 references, {unmerged.adapter_name} adapter, experts not merged"] = gen(unmerged,
                                                                                             reference_images=refs)
    med = interleaved_medians(runs, args.repeats)
    base = med["stock FluxPipeline"]
    model = "shipped toy model" if args.toy else "toy-sized model (random weights)"
    print(f"{model}, 128x128, {args.steps} steps, {args.threads} threads, sampling {cfg or 'FluxPipeline defaults'}; "
          f"medians of {args.repeats}")
    no_adapter = med["ours, 2 references"]
    print("| run | seconds | x stock | x ours, 2 references (no adapter) |\n|---|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f} | {t / no_adapter:.2f} |")


if __name__ == "__main__":
    main()
