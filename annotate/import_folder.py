"""Import an existing folder of images (+ captions) as a dataset with no subjects yet, ready to annotate.

The dataset is written through `multicrafter.dataset_format`.

Captions come from a sidecar `<stem>.txt`, or a `captions.jsonl`/`metadata.jsonl` in the folder with
{"file_name", "caption"} lines. Images larger than `max_side` are downscaled (and reported). Nothing is skipped
silently: every file that is not imported is listed with its reason. With --florence, each imported sample is
pre-annotated (grounded boxes -> masks) for review in the Annotate tab.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from multicrafter.dataset_format import MAX_SIDE, DatasetWriter, sanitize_name
from multicrafter.errors import ArgumentParser, UserError, run_cli
from multicrafter.io import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class ImportReport:
    """What `import_folder` did: samples imported, files skipped with the reason, and notes (downscaling, ...)."""

    imported: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    notes: list[str] = field(default_factory=list)


def _caption_table(src: Path) -> dict[str, str]:
    table: dict[str, str] = {}
    for name in ("captions.jsonl", "metadata.jsonl"):
        path = src / name
        if not path.is_file():
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                table[Path(rec["file_name"]).name] = str(rec.get("caption", rec.get("text", "")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{no}: expected a JSON object with 'file_name' and 'caption'") from None
    return table


def import_folder(src: str | Path, dataset: str | Path, max_side: int = 2048) -> ImportReport:
    """Copy every image of `src` into `dataset` (as PNG, downscaled to `max_side`), with its caption."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"source folder not found: {src}")
    if not 16 <= max_side <= MAX_SIDE:
        raise UserError(f"--max-side must be between 16 and {MAX_SIDE}")
    table = _caption_table(src)
    writer = DatasetWriter(dataset)
    report = ImportReport()
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() not in {".txt", ".jsonl"}:
                report.skipped.append((path.name, "not an image file"))
            continue
        try:
            name = sanitize_name(path.stem)
            if name in writer.names():
                raise UserError(f"a sample named {name!r} already exists")
            img = load_image(path)
            if max(img.size) > max_side:
                s = max_side / max(img.size)
                small = (max(1, round(img.width * s)), max(1, round(img.height * s)))
                report.notes.append(f"{path.name}: downscaled from {img.width}x{img.height} to {small[0]}x{small[1]}")
                img = img.resize(small, Image.Resampling.LANCZOS)
            side = path.with_suffix(".txt")
            caption = side.read_text(encoding="utf-8").strip() if side.is_file() else table.get(path.name, "")
            if not caption:
                report.notes.append(f"{path.name}: no caption found (left empty)")
            writer.add_sample(img, caption, [], name=name)
            report.imported.append(name)
        except UserError as exc:
            report.skipped.append((path.name, str(exc)))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m annotate.import_folder", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder of images (+ <stem>.txt captions or captions.jsonl)")
    parser.add_argument("--out", required=True, help="dataset folder to create or extend")
    parser.add_argument("--max-side", type=int, default=2048, help="downscale larger images to this side")
    parser.add_argument("--florence", metavar="ID|DIR", help="pre-annotate with Florence-2 grounding (hub id or "
                        "folder, e.g. florence-community/Florence-2-base-ft); masks from SAM 2 or GrabCut")
    parser.add_argument("--names", help="comma-separated subject names to ground (default: phrases of the caption)")
    parser.add_argument("--sam2", metavar="ID|DIR", default=None, help="SAM 2 weights (default "
                        "facebook/sam2.1-hiera-tiny; GrabCut when unavailable)")
    args = parser.parse_args(argv)
    grounder = None
    if args.florence:  # load first, so a missing model fails before anything is written
        # torch, transformers and OpenCV load only with --florence: a plain import stays quick
        from .florence import FlorenceGrounder, preannotate_dataset
        from .segment import Segmenter

        grounder = FlorenceGrounder.from_pretrained(args.florence)
    rep = import_folder(args.src, args.out, max_side=args.max_side)
    if grounder is not None:
        seg = Segmenter(args.sam2)
        if seg.note:
            print(f"note: {seg.note}")
        names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
        pre = preannotate_dataset(args.out, grounder, seg, names=names)
        for sample, found in pre.found.items():
            print(f"pre-annotated {sample}: {', '.join(found) or 'nothing found'}")
        for sample, why in pre.skipped:
            print(f"not pre-annotated {sample}: {why}")
    for note in rep.notes:
        print(f"note: {note}")
    for name, why in rep.skipped:
        print(f"skipped {name}: {why}")
    print(f"imported {len(rep.imported)} images into {args.out}, skipped {len(rep.skipped)}")
    return 0 if rep.imported or not rep.skipped else 1


if __name__ == "__main__":
    run_cli(main)
