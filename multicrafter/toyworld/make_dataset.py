"""Making ToyWorld datasets: render samples and write them in the project's dataset format (plus a contact sheet).

The format and its atomic writes belong to `multicrafter.dataset_format`; this module only renders. Each metadata
line carries the format's keys and, under "toyworld", the full scene spec, so the evaluator and the toy rewards can
re-derive masks and attributes. The whole dataset is built in a temporary folder and swapped in when complete
(`dataset_format.new_dataset`). PNG encoding is deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import multiprocessing
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..dataset_format import METADATA, image_file, mask_file, new_dataset, reference_file, save_mask, write_metadata
from ..errors import UserError
from ..io import atomic_write_text, save_image_atomic
from .render import masks_from_labels, render_reference, render_scene
from .scenes import sample_scene, with_boxes


@dataclass
class RenderedScene:
    """One rendered ToyWorld scene: its spec, the image, each subject's exact mask and rendered reference."""

    scene: dict                    # the spec, with visible boxes/areas filled
    image: np.ndarray              # HxWx3 uint8
    masks: list[np.ndarray]        # per subject, bool HxW, exactly its visible pixels
    references: list[np.ndarray]   # per subject, ref_size x ref_size x 3 uint8

    @property
    def prompt(self) -> str:
        """The scene's caption."""
        return self.scene["prompt"]


def render_sample(scene: dict) -> RenderedScene:
    """Render a scene spec (image, masks, references) and fill its boxes."""
    image, labels = render_scene(scene)
    with_boxes(scene, labels)
    refs = [render_reference(s, scene.get("ref_size", 64), s["reference_view"]) for s in scene["subjects"]]
    return RenderedScene(scene=scene, image=image, masks=masks_from_labels(labels, len(scene["subjects"])), references=refs)


def build_sample(seed: int, index: int, split: str = "train", size: int = 128, ref_size: int = 64,
                 **scene_kwargs) -> RenderedScene:
    """Sample and render scene `index` of `seed` (kwargs go to `sample_scene`)."""
    return render_sample(sample_scene(seed, index, split=split, size=size, ref_size=ref_size, **scene_kwargs))


def metadata_line(sample: RenderedScene, stem: str) -> dict:
    """The metadata record of a sample saved under `stem`."""
    subjects = [
        {"name": s["name"], "kind": "object", "mask": mask_file(stem, k), "reference": reference_file(stem, k),
         "box": s["box"]}
        for k, s in enumerate(sample.scene["subjects"])
    ]
    return {"file_name": image_file(stem), "caption": sample.prompt, "subjects": subjects, "toyworld": sample.scene}


def _write_one(tmp: Path, width: int, seed: int, i: int, split: str, size: int, ref_size: int,
               scene_kwargs: dict) -> dict:
    """Render sample `i` and write its files into `tmp`; returns its metadata line (a pure function of the args)."""
    sample = build_sample(seed, i, split=split, size=size, ref_size=ref_size, **scene_kwargs)
    stem = f"{i:0{width}d}"
    save_image_atomic(Image.fromarray(sample.image), tmp / image_file(stem))
    for k, (mask, ref) in enumerate(zip(sample.masks, sample.references)):
        save_mask(mask, tmp / mask_file(stem, k))
        save_image_atomic(Image.fromarray(ref), tmp / reference_file(stem, k))
    return metadata_line(sample, stem)


def _write_chunk(args: tuple) -> list[dict]:
    tmp, width, seed, indices, split, size, ref_size, scene_kwargs = args
    return [_write_one(tmp, width, seed, i, split, size, ref_size, scene_kwargs) for i in indices]


def write_dataset(out: str | os.PathLike, n: int, seed: int = 0, split: str = "train", size: int = 128,
                  ref_size: int = 64, overwrite: bool = False, extra_files: dict[str, str] | None = None,
                  workers: int = 1, **scene_kwargs) -> Path:
    """Write `n` samples to `out` in the dataset format; returns the metadata path.

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
    with new_dataset(root, overwrite=overwrite) as tmp:
        width = max(5, len(str(max(n - 1, 0))))
        workers = max(1, min(int(workers), n))
        step = max(1, -(-n // (workers * 4)))  # a few chunks per process, in index order
        chunks = [(tmp, width, seed, range(a, min(a + step, n)), split, size, ref_size, scene_kwargs)
                  for a in range(0, n, step)]
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                lines = [line for chunk in pool.imap(_write_chunk, chunks) for line in chunk]
        else:
            lines = [line for chunk in map(_write_chunk, chunks) for line in chunk]
        write_metadata(tmp, lines, sort_keys=True)
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
    return root / METADATA


MASK_TINTS = ((255, 60, 60), (60, 120, 255), (40, 200, 80), (255, 200, 0))


def contact_sheet(samples: list[RenderedScene], scale: int = 2) -> Image.Image:
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
