"""Where along the sampling path does the toy lose each subject's shape? (docs/report.md, section 1)

    python bench/sdedit_shape.py toy none 60 1.0,0.95,0.9,0.85,0.8,0.7,0.5 runs/sdedit.json  # model, adapter|none,
                                                                    # scenes, start levels t0, [results JSON]
    python bench/sdedit_shape.py plot docs/toy_shape_sdedit.png A.json B.json     # accuracy against t0, per JSON

`eval denoise` scores one-step clean-image predictions; at high noise even a perfect model predicts a blurred mean
there, so it cannot say whether *sampling* would find the outline. This probe runs the toy's own sampler (20 steps,
FLUX's dynamic shift, true CFG 3, full prompts) but starts it from the held-out render noised to t0 (SDEdit):
t0 = 1 is ordinary generation, and the t0 at which shape accuracy collapses is where the model fails to draw outlines.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from multicrafter import MultiCrafterPipeline
from multicrafter.eval.toyworld_scores import evaluate_scenes, summarise
from multicrafter.presets import true_cfg_arguments
from multicrafter.references import encode_image, pack_latents
from multicrafter.sde import flux_mu, flux_schedule

KEYS = ("id_sim", "leakage", "layout", "overall", "acc_shape", "acc_colour", "acc_pattern")
STEPS = 20


def tail_schedule(scheduler, t0: float, steps: int = STEPS, tokens: int = 256) -> tuple[float, list[float]]:
    """The ordinary schedule's steps at sigma <= t0 (`multicrafter.sde.flux_schedule`, as FluxPipeline builds it):
    (first actual sigma, those sigmas before the dynamic shift, which the pipeline applies again to `sigmas`)."""
    actual = flux_schedule(scheduler, steps, tokens).sigmas[:-1].double().numpy()
    shift = math.exp(flux_mu(scheduler.config, tokens))
    tail = actual[actual <= t0 + 1e-6]
    return float(tail[0]), list(tail / (shift - (shift - 1) * tail))


def plot(png: str, paths: list[str]) -> None:
    """Shape / colour / pattern accuracy against the start level t0, one line style per results JSON."""
    import matplotlib  # only with a plot to draw; the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for style, path in zip(("-", "--", ":", "-."), paths):
        res = json.loads(Path(path).read_text())
        rows = sorted(res["rows"], key=lambda r: r["first_sigma"])
        for key, colour in (("acc_shape", "C3"), ("acc_colour", "C0"), ("acc_pattern", "C2")):
            ax.plot([r["first_sigma"] for r in rows], [r[key] for r in rows], style, color=colour, marker="o", ms=3,
                    label=f"{key[4:]}, {res['label']}")
    ax.axhline(1 / 8, color="grey", lw=0.8, ls=":")
    ax.text(0.93, 1 / 8 - 0.05, "shape chance", color="grey", fontsize=7)
    ax.set_xlabel("sampling started from the render noised to sigma (1 = ordinary generation)")
    ax.set_ylabel("attribute accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("Where the toy loses its outlines: SDEdit from held-out renders", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)


def main(argv: list[str]) -> None:
    if argv[0] == "plot":
        return plot(argv[1], argv[2:])
    model, adapter = argv[0], (False if argv[1] == "none" else argv[1])
    n, starts = int(argv[2]), [float(x) for x in argv[3].split(",")]
    cfg = true_cfg_arguments(3.0, negative_prompt="")
    torch.set_num_threads(2)
    pipe = MultiCrafterPipeline.from_pretrained(model, adapter=adapter, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for t0 in starts:
        first, sigmas = tail_schedule(pipe.scheduler, t0)

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
        rows.append({"t0": t0, "first_sigma": first, "steps": len(sigmas), **{k: res[k] for k in KEYS}})
        print(f"t0 {t0:g} (first sigma {first:.3f}, {len(sigmas)} steps):", {k: round(res[k], 3) for k in KEYS},
              f"({time.time() - t:.0f} s)", flush=True)
    if len(argv) > 4:
        label = "shipped base" if model == "toy" else Path(model).parent.name
        Path(argv[4]).write_text(json.dumps({"label": label, "model": model, "adapter": argv[1], "n": n,
                                             "command": "python bench/sdedit_shape.py " + " ".join(argv),
                                             "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
