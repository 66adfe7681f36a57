"""Where along the sampling path does the toy lose each subject's shape? (session 13)

    python bench/sdedit_shape.py none 60 1.0,0.95,0.9,0.8,0.7      # adapter|none, scenes, start levels t0

`eval denoise` scores one-step clean-image predictions; at high noise even a perfect model predicts a blurred mean
there, so it cannot say whether *sampling* would find the outline. This probe runs the toy's own sampler (20 steps,
FLUX's dynamic shift, true CFG 3, full prompts) but starts it from the held-out render noised to t0 (SDEdit):
t0 = 1 is ordinary generation, and the t0 at which shape accuracy collapses is where the model fails to draw outlines.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from multicrafter import MultiCrafterPipeline
from multicrafter.eval.toy import evaluate_scenes, summarise
from multicrafter.presets import true_cfg_arguments
from multicrafter.references import encode_image, pack_latents

KEYS = ("id_sim", "leakage", "layout", "overall", "acc_shape", "acc_colour", "acc_pattern")
STEPS = 20
DYNAMIC_SHIFT = math.exp(0.5)  # FLUX's dynamic shift at 256 image tokens, which the scheduler applies to `sigmas`


def tail_schedule(t0: float, steps: int = STEPS, shift: float = DYNAMIC_SHIFT) -> tuple[float, list[float]]:
    """The ordinary schedule's steps at sigma <= t0: (first actual sigma, the unshifted sigmas to pass)."""
    base = np.linspace(1.0, 1 / steps, steps)
    actual = shift * base / (1 + (shift - 1) * base)
    keep = actual <= t0 + 1e-6
    return float(actual[keep][0]), list(base[keep])


def main(argv: list[str]) -> None:
    adapter = False if argv[0] == "none" else argv[0]
    n, starts = int(argv[1]), [float(x) for x in argv[2].split(",")]
    cfg = true_cfg_arguments(3.0, negative_prompt="")
    torch.set_num_threads(2)
    pipe = MultiCrafterPipeline.from_pretrained("toy", adapter=adapter, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for t0 in starts:
        first, sigmas = tail_schedule(t0)

        def generate(sample, seeds, first=first, sigmas=sigmas):
            h, w = sample.image.shape[:2]
            x0 = pack_latents(encode_image(pipe.vae, Image.fromarray(sample.image), "cpu"))
            noise = torch.randn((len(seeds), *x0.shape[1:]), generator=torch.Generator().manual_seed(seeds[0]))
            latents = (1 - first) * x0 + first * noise
            out = pipe(prompt=sample.prompt, reference_images=[Image.fromarray(r) for r in sample.references],
                       height=h, width=w, num_inference_steps=len(sigmas), guidance_scale=1.0, sigmas=sigmas,
                       latents=latents, num_images_per_prompt=len(seeds), **cfg)
            return list(out.images)

        t = time.time()
        res = summarise(evaluate_scenes(n, [0], generate), n)
        print(f"t0 {t0:g} (first sigma {first:.3f}, {len(sigmas)} steps):", {k: round(res[k], 3) for k in KEYS},
              f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
