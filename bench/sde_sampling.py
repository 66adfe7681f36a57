"""Does a stochastic sampler at high noise recover the toy's outlines? (No: docs/report.md.)

    python bench/sde_sampling.py none 60 0,0.5,1.0 6      # adapter|none, scenes, SDE noise levels a, window steps

`bench/sdedit_shape.py` showed the toy loses each subject's shape in the first steps of sampling (sigma 1 -> 0.8).
Undertrained diffusion models often sample better with fresh noise injected where their ODE drifts (EDM's churn);
here the first `window` of 20 steps run IPPO's own SDE step (`multicrafter.sde.sde_step`, noise level a; a = 0 is
the Euler step), the rest the ODE, with true CFG 3 and full prompts, scored like `eval toy` (seed 0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from multicrafter import MultiCrafterPipeline
from multicrafter.eval.toyworld_scores import evaluate_scenes, summarise
from multicrafter.rollout import GroupInput, RolloutOptions, rollout

KEYS = ("id_sim", "leakage", "layout", "overall", "acc_shape", "acc_colour", "acc_pattern")
STEPS = 20


def main(argv: list[str]) -> None:
    adapter = False if argv[0] == "none" else argv[0]
    n, levels = int(argv[1]), [float(x) for x in argv[2].split(",")]
    window = list(range(int(argv[3]) if len(argv) > 3 else 6))
    torch.set_num_threads(2)
    pipe = MultiCrafterPipeline.from_pretrained("toy", adapter=adapter, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for a in levels:
        options = RolloutOptions(num_steps=STEPS, height=128, width=128, guidance_scale=1.0, noise_level=a,
                                 group_size=1, max_sequence_length=pipe.sampling_defaults.get("max_sequence_length", 512),
                                 true_cfg_scale=3.0)

        def generate(sample, seeds, options=options):
            group = GroupInput(sample.prompt, [Image.fromarray(r) for r in sample.references])
            return [rollout(pipe, [group], window, options, torch.Generator().manual_seed(s)).images[0] for s in seeds]

        t = time.time()
        res = summarise(evaluate_scenes(n, [0], generate), n)
        print(f"SDE a={a:g} on steps {window[0]}-{window[-1]} of {STEPS}:", {k: round(res[k], 3) for k in KEYS},
              f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
