"""Cost of attention capture during training: forward + backward with capture off / ref2img / img2ref.

CPU default: a 5.9 M-parameter FLUX-architecture transformer (hidden 192, 3 double + 3 single blocks) at 256x256 with
two 128x128 references (256 target + 128 reference tokens). `--flux-size` (GPU): FLUX.1-dev dimensions (19 double,
38 single blocks, hidden 3072, random weights, bf16) at 512x512 with two 320x320 references, gradient checkpointing.

Off: loss = mean(v^2). On: the same + Dice loss on the captured maps (what pre-training does). Prints medians over
interleaved repeats, peak memory and the ratios against "off".
    python bench/attention_capture.py [--repeats 7] [--flux-size --device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from diffusers import FluxTransformer2DModel  # noqa: E402

from bench.measure import interleaved_medians, peak_memory, saved_activation_bytes  # noqa: E402
from multicrafter.attention import AttentionCapture, CaptureLayout, install_capture, normalize_maps, remove_capture  # noqa: E402
from multicrafter.losses import dice_loss  # noqa: E402

SMALL = dict(patch_size=1, in_channels=64, num_layers=3, num_single_layers=3, attention_head_dim=48,
             num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
             axes_dims_rope=(8, 20, 20))
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))


def build(flux_size: bool, device: str, dtype: torch.dtype, checkpointing: bool = True):
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**(FLUX if flux_size else SMALL)).to(dtype)
    model.requires_grad_(False)
    # Train only the double blocks' q/k projections (like an attention LoRA would): backward runs the whole stack.
    for b in model.transformer_blocks:
        b.attn.to_q.weight.requires_grad_(True)
        b.attn.to_k.weight.requires_grad_(True)
    if flux_size and checkpointing:
        model.enable_gradient_checkpointing()
    return model


def inputs(flux_size: bool, device: str, dtype: torch.dtype):
    size, ref, n_text, ctx = (512, 320, 512, 4096) if flux_size else (256, 128, 32, 64)
    gt, gr = size // 16, ref // 16
    n_t, lengths = gt * gt, [gr * gr, gr * gr]
    g = torch.Generator().manual_seed(0)
    ids = [torch.stack(torch.meshgrid(torch.arange(gt), torch.arange(gt), indexing="ij"), -1).reshape(-1, 2)]
    for k in range(2):
        yx = torch.stack(torch.meshgrid(torch.arange(gr), torch.arange(gr), indexing="ij"), -1).reshape(-1, 2)
        ids.append(yx + gt + k * gr)
    img_ids = torch.cat([torch.zeros(n_t + sum(lengths), 1), torch.cat(ids).float()], 1)
    kw = dict(hidden_states=torch.randn(1, n_t + sum(lengths), 64, generator=g),
              encoder_hidden_states=torch.randn(1, n_text, ctx, generator=g),
              pooled_projections=torch.randn(1, 768 if flux_size else 64, generator=g),
              timestep=torch.full((1,), 0.5), guidance=torch.full((1,), 3.5), img_ids=img_ids,
              txt_ids=torch.zeros(n_text, 3))
    kw = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
          for k, v in kw.items()}
    masks = torch.zeros(1, 2, n_t, device=device)
    masks[:, 0, : n_t // 2] = 1
    masks[:, 1, n_t // 2:] = 1
    return kw, CaptureLayout(n_text, n_t, lengths), masks


def step_fn(model, kw, layout, masks, mode: str | None):
    capture = None
    remove_capture(model)
    if mode is not None:
        capture = AttentionCapture(mode=mode, layout=layout)
        install_capture(model, capture)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**kw, return_dict=False)[0][:, : layout.n_target]
        loss = out.float().pow(2).mean()
        if capture is not None:
            loss = loss + 0.1 * dice_loss(normalize_maps(capture.aggregate()), masks)
        loss.backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--flux-size", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-checkpointing", action="store_true", help="FLUX size: keep all activations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        # torch 2.11 + cuDNN 9 on H200: the cuDNN SDPA backward fails ("mha_graph.execute ... is_good()") at these
        # sequence lengths, with or without capture; use the flash / memory-efficient kernels instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if args.flux_size else torch.float32
    model = build(args.flux_size, args.device, dtype, checkpointing=not args.no_checkpointing)
    kw, layout, masks = inputs(args.flux_size, args.device, dtype)
    modes = {"off": None, "ref2img": "ref2img", "img2ref": "img2ref"}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters, {layout.n_text} text + {layout.n_target} target + "
          f"{sum(layout.ref_lengths)} reference tokens, device {args.device}, {dtype}")
    # Each call re-installs its processors (cheap), so the three configurations can be interleaved on one model.
    run = {name: (lambda m=m: step_fn(model, kw, layout, masks, m)()) for name, m in modes.items()}
    medians = interleaved_medians(run, args.repeats)
    results = {}
    for name, m in modes.items():
        if args.device.startswith("cuda"):
            mem, label = peak_memory(run[name], args.device), "peak allocated"
        else:
            mem, label = saved_activation_bytes(step_fn(model, kw, layout, masks, m)), "saved for backward"
        results[name] = dict(seconds=medians[name], memory_bytes=mem)
    base = results["off"]
    print(f"| capture | median fwd+bwd (s) | x off | {label} (MiB) | x off |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.4f} | {r['seconds'] / base['seconds']:.3f} | "
              f"{r['memory_bytes'] / 2**20:.1f} | {r['memory_bytes'] / base['memory_bytes']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
