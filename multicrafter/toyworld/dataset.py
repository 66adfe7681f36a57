"""Building ToyWorld samples and writing them in the DESIGN §6 dataset format (plus a contact sheet).

Each metadata line carries the §6 keys and, under "toyworld", the full scene spec, so the evaluator and the toy
rewards can re-derive masks and attributes. Files are written atomically; metadata.jsonl is written last, in one
atomic replace, so a folder never lists a half-written sample. PNG encoding is deterministic: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from ..io import atomic_write_text, replace_dir, save_image_atomic
from .render import masks_from_labels, render_reference, render_scene
from .scenes import sample_scene, with_boxes


@dataclass
class Sample:
    scene: dict                    # the spec, with visible boxes/areas filled
    image: np.ndarray              # HxWx3 uint8
    masks: list[np.ndarray]        # per subject, bool HxW, exactly its visible pixels
    references: list[np.ndarray]   # per subject, ref_size x ref_size x 3 uint8

    @property
    def prompt(self) -> str:
        return self.scene["prompt"]


def render_sample(scene: dict) -> Sample:
    """Render a scene spec (image, masks, references) and fill its boxes."""
    image, labels = render_scene(scene)
    with_boxes(scene, labels)
    refs = [render_reference(s, scene.get("ref_size", 64), s["reference_view"]) for s in scene["subjects"]]
    return Sample(scene=scene, image=image, masks=masks_from_labels(labels, len(scene["subjects"])), references=refs)


def build_sample(seed: int, index: int, split: str = "train", size: int = 128, ref_size: int = 64,
                 **scene_kwargs) -> Sample:
    """Sample and render scene `index` of `seed` (kwargs go to `sample_scene`)."""
    return render_sample(sample_scene(seed, index, split=split, size=size, ref_size=ref_size, **scene_kwargs))


def metadata_line(sample: Sample, stem: str) -> dict:
    """The §6 metadata record of a sample saved under `stem`."""
    subjects = [
        {"name": s["name"], "kind": "object", "mask": f"masks/{stem}_{k}.png", "reference": f"refs/{stem}_{k}.png",
         "box": s["box"]}
        for k, s in enumerate(sample.scene["subjects"])
    ]
    return {"file_name": f"images/{stem}.png", "caption": sample.prompt, "subjects": subjects, "toyworld": sample.scene}


def _write_one(tmp: Path, width: int, seed: int, i: int, split: str, size: int, ref_size: int,
               scene_kwargs: dict) -> str:
    """Render sample `i` and write its files into `tmp`; returns its metadata line (a pure function of the args)."""
    sample = build_sample(seed, i, split=split, size=size, ref_size=ref_size, **scene_kwargs)
    stem = f"{i:0{width}d}"
    save_image_atomic(Image.fromarray(sample.image), tmp / "images" / f"{stem}.png")
    for k, (mask, ref) in enumerate(zip(sample.masks, sample.references)):
        save_image_atomic(Image.fromarray(mask.astype(np.uint8) * 255), tmp / "masks" / f"{stem}_{k}.png")
        save_image_atomic(Image.fromarray(ref), tmp / "refs" / f"{stem}_{k}.png")
    return json.dumps(metadata_line(sample, stem), sort_keys=True)


def _write_chunk(args: tuple) -> list[str]:
    tmp, width, seed, indices, split, size, ref_size, scene_kwargs = args
    return [_write_one(tmp, width, seed, i, split, size, ref_size, scene_kwargs) for i in indices]


def write_dataset(out: str | os.PathLike, n: int, seed: int = 0, split: str = "train", size: int = 128,
                  ref_size: int = 64, overwrite: bool = False, extra_files: dict[str, str] | None = None,
                  workers: int = 1, **scene_kwargs) -> Path:
    """Write `n` samples to `out` in the §6 format; returns the metadata path.

    `workers` > 1 renders in that many processes; every sample depends only on (seed, index), so the files and the
    metadata are byte-identical to a single-process write.

    The dataset is rendered into a temporary sibling folder and swapped in at the end, so an interrupted or failed
    write leaves the previous dataset (or nothing) in place, never a half-written one. An existing dataset is only
    replaced with `overwrite`; a non-empty folder that is not a dataset is never touched. `extra_files` (name ->
    text) are written into the folder in the same swap.
    """
    if n < 0:
        raise UserError(f"--n must be >= 0, got {n}")
    if size < 32 or size % 16:
        raise UserError(f"--size must be a multiple of 16 and >= 32, got {size}")
    if ref_size < 16:
        raise UserError(f"--ref-size must be >= 16, got {ref_size}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"output path exists and is not a folder: {root}")
    exists = root.is_dir() and any(root.iterdir())
    if exists and not (root / "metadata.jsonl").exists():
        raise UserError(f"{root} is not empty and holds no dataset (no metadata.jsonl); choose another folder")
    if exists and not overwrite:
        raise UserError(f"{root / 'metadata.jsonl'} already exists (pass --overwrite to replace the dataset)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        width = max(5, len(str(max(n - 1, 0))))
        workers = max(1, min(int(workers), n))
        step = max(1, -(-n // (workers * 4)))  # a few chunks per process, in index order
        chunks = [(tmp, width, seed, range(a, min(a + step, n)), split, size, ref_size, scene_kwargs)
                  for a in range(0, n, step)]
        if workers > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                lines = [line for chunk in pool.imap(_write_chunk, chunks) for line in chunk]
        else:
            lines = [line for chunk in map(_write_chunk, chunks) for line in chunk]
        atomic_write_text(tmp / "metadata.jsonl", "".join(line + "\n" for line in lines))
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "metadata.jsonl"


MASK_TINTS = ((255, 60, 60), (60, 120, 255), (40, 200, 80), (255, 200, 0))


def contact_sheet(samples: list[Sample], scale: int = 2) -> Image.Image:
    """One row per sample: scene | coloured masks | references, with the prompt underneath (for the README)."""
    rows = []
    for s in samples:
        h, w = s.image.shape[:2]
        overlay = np.full_like(s.image, 30)
        for k, m in enumerate(s.masks):
            overlay[m] = MASK_TINTS[k % len(MASK_TINTS)]
        refs = [np.asarray(Image.fromarray(r).resize((h // 2, h // 2), Image.NEAREST)) for r in s.references]
        ref_col = np.full((h, (h // 2 + 4) * 2, 3), 255, np.uint8)
        for k, r in enumerate(refs[:4]):
            y, x = (k // 2) * (h // 2), (k % 2) * (h // 2 + 4)
            ref_col[y:y + h // 2, x:x + h // 2] = r
        gap = np.full((h, 6, 3), 255, np.uint8)
        row = np.concatenate([s.image, gap, overlay, gap, ref_col], axis=1)
        row = np.asarray(Image.fromarray(row).resize((row.shape[1] * scale, h * scale), Image.NEAREST))
        lines = textwrap.wrap(s.prompt, width=max(20, row.shape[1] // 6))
        text = Image.new("RGB", (row.shape[1], 12 * len(lines) + 6), (255, 255, 255))
        ImageDraw.Draw(text).multiline_text((4, 2), "\n".join(lines), fill=(0, 0, 0), spacing=2)
        rows.append(np.concatenate([row, np.asarray(text), np.full((4, row.shape[1], 3), 255, np.uint8)]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return Image.fromarray(np.concatenate(rows, axis=0))
