"""Offline examples: ToyWorld scenes (test-split identities) rendered to files, so one click runs a real prompt.

Nothing is downloaded or committed: references, the ground-truth scene and its per-subject masks are rendered by
`multicrafter.toyworld` into a cache folder at startup (a few milliseconds). The masks give the Attention tab an
exact region for each subject's bleeding score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# (seed, index, subjects, similar pair kind): a plain pair, a similar-colour pair (where leakage shows), three subjects
EXAMPLE_SCENES = ((7, 2, 2, None), (7, 5, 2, "colour"), (3, 1, 3, None))


@dataclass
class Example:
    references: list[str]
    names: list[str]
    prompt: str
    masks: list[str]
    scene: str


def make_examples(folder: str | Path, size: int = 128) -> list[Example]:
    """Render the example scenes at `size` into `folder` (kept between launches).

    The size is part of every file name, so an app at another size never picks up stale files, and each file is
    written atomically, so two apps starting at once never read a half-written PNG."""
    from multicrafter.io import save_image_atomic
    from multicrafter.toyworld import build_sample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed, index, n, similar in EXAMPLE_SCENES:
        sample = build_sample(seed, index, split="test", size=size, n_subjects=n, similar=similar)
        stem = f"toy_{seed}_{index}_{size}"
        refs, masks = [], []
        for k, (ref, mask) in enumerate(zip(sample.references, sample.masks)):
            rp, mp = folder / f"{stem}_ref{k}.png", folder / f"{stem}_mask{k}.png"
            if not rp.exists():
                save_image_atomic(Image.fromarray(ref), rp)
            if not mp.exists():
                save_image_atomic(Image.fromarray(np.asarray(mask, np.uint8) * 255), mp)
            refs.append(str(rp))
            masks.append(str(mp))
        scene = folder / f"{stem}_scene.png"
        if not scene.exists():
            save_image_atomic(Image.fromarray(sample.image), scene)
        out.append(Example(refs, [s["name"] for s in sample.scene["subjects"]], sample.prompt, masks, str(scene)))
    return out
