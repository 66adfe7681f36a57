"""Does the toy's sampling schedule decide its shape accuracy? (No: docs/report.md.)

    python bench/sampling_shift.py none 60 1.6487,3,6 20 3      # adapter|none, scenes, total shifts, steps, true CFG

The toy samples with FLUX's dynamic shifting, which at 256 image tokens is a time shift of e^0.5 = 1.65, while the
shift-3 and large-batch bases trained with shift 3. Each total shift s is applied by passing FluxPipeline `sigmas` pre-shifted by
s / 1.65 (time shifts compose by multiplying), then the images are scored like `eval toy` (seed 0, full prompts).
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
from multicrafter.eval.toyworld_scores import evaluate_scenes, summarise
from multicrafter.presets import true_cfg_arguments

KEYS = ("id_sim", "leakage", "layout", "overall", "acc_shape", "acc_colour", "acc_pattern")


def shifted_sigmas(total_shift: float, steps: int, dynamic_shift: float = math.exp(0.5)) -> list[float]:
    s = total_shift / dynamic_shift
    sig = np.linspace(1.0, 1 / steps, steps)
    return list(s * sig / (1 + (s - 1) * sig))


def main(argv: list[str]) -> None:
    adapter = False if argv[0] == "none" else argv[0]
    n, shifts = int(argv[1]), [float(x) for x in argv[2].split(",")]
    steps = int(argv[3]) if len(argv) > 3 else 20
    cfg = true_cfg_arguments(float(argv[4]) if len(argv) > 4 else 3.0, negative_prompt="")
    torch.set_num_threads(2)
    pipe = MultiCrafterPipeline.from_pretrained("toy", adapter=adapter, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for shift in shifts:
        sigmas = shifted_sigmas(shift, steps)

        def generate(sample, seeds, sigmas=sigmas):
            h, w = sample.image.shape[:2]
            out = pipe(prompt=sample.prompt, reference_images=[Image.fromarray(r) for r in sample.references],
                       height=h, width=w, num_inference_steps=steps, guidance_scale=1.0, sigmas=sigmas,
                       num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(x) for x in seeds],
                       **cfg)
            return list(out.images)

        t = time.time()
        res = summarise(evaluate_scenes(n, [0], generate), n)
        print(f"shift {shift:g}, {steps} steps:", {k: round(res[k], 3) for k in KEYS}, f"({time.time() - t:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
