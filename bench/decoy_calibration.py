"""Calibration of the ToyWorld decoy control (`leakage_real` vs `leakage_decoy`, multicrafter/toyworld/evaluate.py).

    python bench/decoy_calibration.py [--n 150] [--subjects 4] [--seed 0]

Held-out scenes are re-rendered with random attribute errors that have nothing to do with the other subjects (each
subject's shape redrawn with p 0.8, pattern with p 0.5, colours with p 0.4, uniformly). With no bleeding, leakage
against the other subjects and against their decoys should agree: the printed gap (with its standard error over
scenes) is the control's own bias, the yardstick for a model's gap. With 3+ subjects a second line adds real
bleeding (every subject takes its neighbour's pattern) to show the gap the control is meant to catch. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multicrafter.toyworld import build_sample, evaluate_image, render_scene  # noqa: E402
from multicrafter.toyworld.subjects import COLOUR_NAMES, PATTERNS, SHAPES  # noqa: E402


def _gap(n: int, subjects: int, seed: int, bleed: bool) -> tuple[float, float, float, float, int]:
    rng = np.random.default_rng(seed)
    real, decoy = [], []
    for i in range(n):
        s = build_sample(7 + seed, i, split="test", n_subjects=subjects, similar_prob=1.0)
        scene = copy.deepcopy(s.scene)
        subs = scene["subjects"]
        for subj in subs:
            if rng.random() < 0.8:
                subj["shape"] = str(rng.choice(SHAPES))
            if rng.random() < 0.5:
                subj["pattern"] = str(rng.choice(PATTERNS))
            if rng.random() < 0.4:
                subj["colours"] = [str(c) for c in rng.choice(COLOUR_NAMES, 2, replace=False)]
        if bleed:
            truth = s.scene["subjects"]
            for k, subj in enumerate(subs):
                subj["pattern"] = truth[(k + 1) % len(subs)]["pattern"]
        r = evaluate_image(render_scene(scene)[0], s.references, s.scene, decoys=True)
        if r["leakage_decoy"] is not None:
            real.append(r["leakage_real"])
            decoy.append(r["leakage_decoy"])
    d = np.array(real) - np.array(decoy)
    return float(np.mean(real)), float(np.mean(decoy)), float(d.mean()), float(d.std() / np.sqrt(len(d))), len(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # with two subjects of a similar pair, taking the other's pattern makes the subject the other (matched to it)
    for bleed in (False, True) if args.subjects >= 3 else (False,):
        real, decoy, gap, se, n = _gap(args.n, args.subjects, args.seed, bleed)
        what = "random errors + neighbour's pattern" if bleed else "random errors only"
        print(f"{args.subjects} subjects, {n} scenes, {what}: leakage_real {real:.3f}, leakage_decoy {decoy:.3f}, "
              f"gap {gap:+.3f} ± {se:.3f} (s.e.)")


if __name__ == "__main__":
    main()
