"""`python -m multicrafter.generate`: one image from reference subjects and a prompt, written with its parameters.

The PNG carries the generation parameters in its text metadata (key `multicrafter`, JSON), so any output can be
reproduced. `--attention-out` also writes a figure of each subject's attention map over the image.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .errors import ArgumentParser, UserError, run_cli
from .io import load_image
from .reference_crops import subject_reference


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (shared with `--help`)."""
    p = ArgumentParser(prog="python -m multicrafter.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy", help="toy (embedded), tiny (random, tests), a diffusers folder or hub id")
    p.add_argument("--adapter", default=None,
                   help="named adapter of the model (e.g. ippo, attn), an adapter folder or LoRA file, or a Hub id "
                        "owner/name[@revision][/subfolder or /file.safetensors]; UNO's LoRA format is converted once")
    p.add_argument("--no-adapter", action="store_true", help="run the base model without any adapter")
    p.add_argument("--ref", action="append", default=[], metavar="IMAGE", help="reference subject image (repeat, 1-4)")
    p.add_argument("--kind", action="append", default=[], choices=["object", "face"],
                   help="kind of each --ref, in order (default object); a face is cropped to its largest face")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--attention-out", default=None, help="also write a PNG figure of the per-subject attention maps")
    p.add_argument("--height", type=int, default=None, help="multiple of 16 (default: the model's native size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the adapter's (UNO: 25), else 20 for toy/tiny and 28 for FLUX)")
    p.add_argument("--guidance", type=float, default=None, help="default: the adapter's (UNO: 4.0), else 3.5")
    p.add_argument("--true-cfg", type=float, default=None,
                   help="true CFG scale against the empty prompt (default: the model's, toy: 3; 1 = off, twice as fast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cpu-offload", action="store_true", help="the same as --offload model")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "nf4"],
                   help="weights of the transformer and T5: int8/fp8 (torchao, CPU or GPU), nf4 (bitsandbytes, GPU)")
    p.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                   help="CPU offload on a GPU: model (one component at a time) or sequential (one layer, least memory)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in VAE tiles (on by itself above 1024x1024)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Check every input, load the model, generate one image and write it (and the attention figure); exit code."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {out.name}")
    for label, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and (v <= 0 or v % 16):
            raise UserError(f"{label} must be a positive multiple of 16, got {v}")
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.true_cfg is not None:
        from .presets import true_cfg_arguments  # torch + diffusers: only after the cheap checks have passed

        true_cfg_arguments(args.true_cfg)  # checked before anything loads
    if args.attention_out and not args.ref:
        raise UserError("--attention-out needs at least one --ref")
    offload = "model" if args.cpu_offload and args.offload == "none" else args.offload

    from .memory import check_modes  # imports torch: after the file checks above

    check_modes(args.quantize, offload)

    from .references import MAX_REFERENCES  # imports torch: only after the cheap checks have passed

    if len(args.ref) > MAX_REFERENCES:
        raise UserError(f"too many references: {len(args.ref)} (at most {MAX_REFERENCES})")
    if args.kind and len(args.kind) != len(args.ref):
        raise UserError(f"give one --kind per --ref or none: {len(args.kind)} --kind for {len(args.ref)} --ref")
    refs = []
    for i, ref in enumerate(args.ref):   # every file is checked (and faces cropped) before any model loads
        try:
            img = load_image(ref)
        except UserError as exc:
            raise UserError(f"reference {i + 1}: {exc}") from None
        if args.kind and args.kind[i] == "face":
            img, note = subject_reference(img, "face")
            if note:
                print(f"note: reference {i + 1} ({Path(ref).name}): {note}")
        refs.append(img)

    # the diffusion stack (torch, diffusers) loads only once every input is known to be good: bad input fails fast
    import torch

    from .attention_overlay import save_attention_figure
    from .generation_params import save_generation
    from .pipeline import MultiCrafterPipeline
    from .presets import true_cfg_arguments

    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    pipe = MultiCrafterPipeline.from_pretrained(
        args.model, adapter=False if args.no_adapter else args.adapter, dtype=dtype,   # False: not even toy's default
        device=device, quantize=args.quantize, offload=offload, vae_tiling=args.vae_tiling,
    )
    params = dict(pipe.sampling_defaults, prompt=args.prompt)
    for key, value in (("height", args.height), ("width", args.width), ("guidance_scale", args.guidance),
                       ("num_inference_steps", args.steps)):
        if value is not None:
            params[key] = value
    scale = args.true_cfg if args.true_cfg is not None else params.get("true_cfg_scale", 1.0)
    params.pop("negative_prompt", None)
    params.update(true_cfg_arguments(scale, negative_prompt=pipe.sampling_defaults.get("negative_prompt", "")))
    params.setdefault("num_inference_steps", 20 if args.model in ("toy", "tiny") else 28)
    params.setdefault("guidance_scale", 3.5)
    if args.max_sequence_length or args.model in ("toy", "tiny"):
        params["max_sequence_length"] = args.max_sequence_length or 64
    result = pipe(reference_images=refs, generator=torch.Generator().manual_seed(args.seed),
                  return_attention=bool(args.attention_out), **params)
    meta = dict(params, model=args.model, adapter=pipe.adapter_name, seed=args.seed,
                references=[Path(r).name for r in args.ref], kinds=args.kind or ["object"] * len(args.ref),
                quantize=args.quantize, offload=offload)
    save_generation(result.images[0], out, meta)
    print(f"wrote {out}")
    if args.attention_out:
        save_attention_figure(result.images[0], result.attention_maps, args.attention_out,
                              names=[Path(r).stem for r in args.ref])
        print(f"wrote {args.attention_out}")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    run_cli(main)
