"""ToyWorld throughput: scenes rendered per second (scene + masks + references) and evaluation images per second.

    python bench/toyworld.py [--n 200] [--repeats 5] [--size 128]

Medians over repeats (CPU timing on shared cores is noisy). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multicrafter.toyworld import build_sample, evaluate_image  # noqa: E402
from multicrafter.toyworld.render import render_scene  # noqa: E402
from multicrafter.toyworld.scenes import sample_scene  # noqa: E402


def _rate(fn, n: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    n, size = args.n, args.size
    specs = [sample_scene(0, i, split="test", size=size) for i in range(n)]
    samples = [build_sample(0, i, split="test", size=size) for i in range(n)]
    evaluate_image(samples[0].image, samples[0].references, samples[0].scene)  # build prototypes once

    scene_only = _rate(lambda: [render_scene(s) for s in specs], n, args.repeats)
    full = _rate(lambda: [build_sample(1, i, split="test", size=size) for i in range(n)], n, args.repeats)
    evals = _rate(lambda: [evaluate_image(s.image, s.references, s.scene) for s in samples], n, args.repeats)
    subj = sum(len(s.references) for s in samples) / n
    print(f"ToyWorld {size}x{size}, {subj:.2f} subjects/scene, median of {args.repeats} x {n}:")
    print(f"  scenes rendered/s (image + labels)             {scene_only:8.1f}")
    print(f"  samples built/s (sample + render + refs + masks) {full:6.1f}")
    print(f"  evaluation images/s (detect + Hungarian + all) {evals:8.1f}")


if __name__ == "__main__":
    main()
