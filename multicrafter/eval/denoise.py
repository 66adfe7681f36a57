"""`python -m multicrafter.eval denoise`: how well a model predicts the clean image from one noise level.

Why: a sampled image can be wrong because the model cannot draw a thing at all, or because it cannot *decide* it
from the prompt and references while the image is still mostly noise. This probe separates the two. Each held-out
ToyWorld scene is noised to level t (x_t = (1 - t) x_0 + t * noise, as in training), the model predicts the velocity
once, and its clean-image estimate x_0 = x_t - t * v is decoded and scored like a generated image. Near-perfect scores
at t = 0.6 with chance-level shape at t = 0.8 mean the silhouette is decided at high noise, where the model is weak.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ArgumentParser, UserError, one_line, run_cli
from ..io import atomic_write_json, save_image_atomic
from ..references import encode_image, encode_references, pack_latents, predict_velocity
from ..rollout import decode_latents
from ..toyworld import build_sample, evaluate_image

SCORES = ("id_sim", "layout", "acc_shape", "acc_colour", "acc_pattern")


def _levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated noise levels like 0.2,0.6,0.8, got {text!r}") from None
    if not levels or any(not (0.0 < t < 1.0) for t in levels):
        raise argparse.ArgumentTypeError(f"noise levels must be strictly between 0 and 1, got {text!r}")
    return levels


def build_parser() -> argparse.ArgumentParser:
    """The `eval denoise` command line."""
    p = ArgumentParser(prog="python -m multicrafter.eval denoise",
                       description="Score one-step clean-image predictions of held-out ToyWorld scenes per noise level.")
    p.add_argument("--model", default="toy", help="toy | a model folder (default: toy)")
    p.add_argument("--adapter", default=None, help="adapter name or folder (default: none, the bare base)")
    p.add_argument("--levels", type=_levels, default=[0.2, 0.4, 0.6, 0.8, 0.95], help="noise levels t in (0, 1)")
    p.add_argument("--n", type=int, default=30, help="held-out scenes")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also save the first scenes' predictions: ground truth, then one column per level")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def predict_clean(pipe: Any, sample: Any, levels: Sequence[float], seed: int) -> list[np.ndarray]:
    """Decoded one-step x_0 estimates of `sample` (a ToyWorld sample), one RGB array per noise level."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    h, w = sample.image.shape[:2]
    z = encode_image(pipe.vae, Image.fromarray(sample.image), device).to(dtype)
    x0 = pack_latents(z)
    grid = (z.shape[2] // 2, z.shape[3] // 2)
    ids = pipe._prepare_latent_image_ids(1, grid[0], grid[1], device, dtype)
    refs = encode_references(pipe.vae, pipe.prepare_references([Image.fromarray(r) for r in sample.references]),
                             grid, 1, device, dtype)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=sample.prompt, prompt_2=None, device=device,
                                                  max_sequence_length=pipe.sampling_defaults.get("max_sequence_length", 512))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    out = []
    for t in levels:
        sigma = torch.tensor([t], device=device, dtype=dtype)
        x_t = (1 - t) * x0 + t * noise
        with torch.no_grad():
            v = predict_velocity(pipe.transformer, x_t, ids, sigma, embeds.to(dtype), pooled.to(dtype), text_ids, refs)
        out.append(np.asarray(decode_latents(pipe, x_t - t * v, h, w)[0].convert("RGB")))
    return out


def run_probe(pipe: Any, levels: Sequence[float], n: int, seed: int = 0, keep: int = 0) -> tuple[dict, list]:
    """Mean scores per level over n held-out scenes; also the first `keep` scenes' rows of images."""
    per = {t: [] for t in levels}
    rows = []
    for i in range(n):
        sample = build_sample(0, i, split="test")
        preds = predict_clean(pipe, sample, levels, seed * 100003 + i)
        refs = [Image.fromarray(r) for r in sample.references]
        for t, img in zip(levels, preds):
            per[t].append(evaluate_image(img, refs, scene=sample.scene))
        if i < keep:
            rows.append([sample.image, *preds])
    return {f"{t:g}": {k: float(np.mean([r[k] for r in rs])) for k in SCORES} for t, rs in per.items()}, rows


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m multicrafter.eval denoise --model toy ... --json out.json`."""
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    # diffusers + transformers take seconds to import: loaded only once the arguments have passed their checks
    from ..pipeline import MultiCrafterPipeline

    try:
        pipe = MultiCrafterPipeline.from_pretrained(args.model, adapter=args.adapter or False)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's model/adapter choice
        raise UserError(f"cannot load model {args.model!r}: {one_line(exc)}") from None
    res, rows = run_probe(pipe, args.levels, args.n, args.seed, keep=6 if args.figure else 0)
    if any(not math.isfinite(v) for scores in res.values() for v in scores.values()):
        raise UserError("the probe produced a non-finite score")
    print(f"one-step clean-image prediction, model={args.model}" + (f" adapter={args.adapter}" if args.adapter else "")
          + f", {args.n} held-out scenes")
    print("| t | " + " | ".join(SCORES) + " |\n|---|" + "---|" * len(SCORES))
    for t, scores in res.items():
        print(f"| {t} | " + " | ".join(f"{scores[k]:.3f}" for k in SCORES) + " |")
    if args.figure:
        grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
        save_image_atomic(Image.fromarray(grid), args.figure)
    if args.json:
        atomic_write_json(args.json, {"model": args.model, "adapter": args.adapter, "n": args.n, "seed": args.seed,
                                      "levels": res})
    return 0


if __name__ == "__main__":
    run_cli(main)
