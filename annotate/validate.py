"""Check a DESIGN §6 dataset and report every problem with its metadata.jsonl line number.

The trainer refuses a dataset with errors (see `annotate.dataset.load_dataset_samples`); warnings (orphan files
left by an interrupted save, blank lines) never block. Run as `python -m annotate.validate DATASET`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multicrafter.errors import ArgumentParser, UserError, run_cli
from multicrafter.io import load_image
from multicrafter.paths import resolve_inside

__all__ = ["DATA_DIRS", "KINDS", "METADATA", "Problem", "errors_of", "main", "parse_box", "read_lines", "resolve_inside",
           "validate_dataset"]

METADATA = "metadata.jsonl"
KINDS = ("face", "object")
DATA_DIRS = ("images", "masks", "refs")


@dataclass(frozen=True)
class Problem:
    """One finding; `line` is the 1-based metadata.jsonl line, or None for dataset-wide findings."""

    line: int | None
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = f"{METADATA}:{self.line}" if self.line is not None else METADATA
        return f"{where}: {self.severity}: {self.message}"


def parse_box(box: Any, size: tuple[int, int] | None = None) -> list[float]:
    """The one box rule (writer and validator): four finite numbers, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height.

    Returns the box as plain floats (numpy scalars would break json.dumps); raises ValueError with a one-line reason.
    Without `size` (image unreadable) only the form and order are checked.
    """
    nums = isinstance(box, (list, tuple, np.ndarray)) and len(box) == 4 and \
        all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in box)
    if not nums:
        raise ValueError(f"'box' must be [x0, y0, x1, y1] (four numbers), got {box!r}")
    vals = [float(v) for v in box]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"'box' values must be finite, got {vals}")
    if not (vals[0] < vals[2] and vals[1] < vals[3]):
        raise ValueError(f"'box' must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {vals}")
    if size is not None and (vals[0] < 0 or vals[1] < 0 or vals[2] > size[0] or vals[3] > size[1]):
        raise ValueError(f"box {vals} lies outside the {size[0]}x{size[1]} image")
    return vals


def read_lines(root: Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Parse metadata.jsonl into (line number, object) pairs; JSON and type errors become problems."""
    meta = root / METADATA
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    if not meta.is_file():
        raise UserError(f"{root} is not a dataset: no {METADATA} at its root")
    try:
        text = meta.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [], [Problem(None, f"{METADATA} is not UTF-8 text")]
    records: list[tuple[int, dict]] = []
    problems: list[Problem] = []
    for no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            problems.append(Problem(no, "blank line (ignored)", "warning"))
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(Problem(no, f"bad JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(no, f"line must be a JSON object, got {type(obj).__name__}"))
            continue
        records.append((no, obj))
    return records, problems


class _Checker:
    """Holds the per-dataset state (seen names, referenced files) while lines are checked."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[Problem] = []
        self.referenced: set[Path] = set()
        self.file_names: dict[str, int] = {}

    def err(self, line: int | None, msg: str, severity: str = "error") -> None:
        self.problems.append(Problem(line, msg, severity))

    def path(self, line: int, rel: Any, what: str) -> Path | None:
        try:
            full = resolve_inside(self.root, rel)
        except ValueError as exc:
            self.err(line, f"{what}: {exc}")
            return None
        if not full.is_file():
            self.err(line, f"{what} file missing: {rel}")
            return None
        if full in self.referenced:
            self.err(line, f"{what} file {rel} is used more than once in the dataset")
        self.referenced.add(full)
        return full

    def check_line(self, line: int, rec: dict) -> None:
        fn = rec.get("file_name")
        size = None
        if not isinstance(fn, str):
            self.err(line, "missing or non-string 'file_name'")
        else:
            if fn in self.file_names:
                self.err(line, f"duplicate file_name {fn!r} (first on line {self.file_names[fn]})")
            else:
                self.file_names[fn] = line
                img = self.path(line, fn, "image")
                if img is not None:
                    try:
                        size = load_image(img).size
                    except UserError as exc:
                        self.err(line, f"image {fn}: {exc}")
        if not isinstance(rec.get("caption"), str):
            self.err(line, "missing or non-string 'caption'")
        subjects = rec.get("subjects")
        if not isinstance(subjects, list):
            self.err(line, "missing 'subjects' list (use [] for an image without subjects)")
            return
        names: set[str] = set()
        for k, sub in enumerate(subjects):
            self.check_subject(line, k, sub, size, names)

    def check_subject(self, line: int, k: int, sub: Any, size: tuple[int, int] | None, names: set[str]) -> None:
        tag = f"subject {k}"
        if not isinstance(sub, dict):
            self.err(line, f"{tag}: must be a JSON object")
            return
        name = sub.get("name")
        if not isinstance(name, str) or not name.strip():
            self.err(line, f"{tag}: missing or empty 'name'")
        elif name in names:
            self.err(line, f"{tag}: duplicate subject name {name!r} in this sample")
        else:
            names.add(name)
            tag = f"subject {k} ({name})"
        if sub.get("kind") not in KINDS:
            self.err(line, f"{tag}: 'kind' must be one of {', '.join(KINDS)}, got {sub.get('kind')!r}")
        self.check_box(line, tag, sub.get("box"), size)
        mask_path = self.path(line, sub.get("mask"), f"{tag}: mask")
        if mask_path is not None:
            self.check_mask(line, tag, mask_path, size)
        ref = self.path(line, sub.get("reference"), f"{tag}: reference")
        if ref is not None:
            try:
                load_image(ref)
            except UserError as exc:
                self.err(line, f"{tag}: reference: {exc}")

    def check_box(self, line: int, tag: str, box: Any, size: tuple[int, int] | None) -> None:
        if box is None:
            return
        try:
            parse_box(box, size)
        except ValueError as exc:
            self.err(line, f"{tag}: {exc}")

    def check_mask(self, line: int, tag: str, path: Path, size: tuple[int, int] | None) -> None:
        try:
            with Image.open(path) as m:
                mode, msize = m.mode, m.size
                arr = np.asarray(m.convert("L")) if mode in ("L", "1") else None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the same finding for the user
            self.err(line, f"{tag}: mask is not a readable image ({type(exc).__name__})")
            return
        if arr is None:
            self.err(line, f"{tag}: mask must be an 8-bit single-channel image, got mode {mode}")
            return
        if size is not None and msize != size:
            self.err(line, f"{tag}: mask size {msize[0]}x{msize[1]} differs from image size {size[0]}x{size[1]}")
        peak = int(arr.max(initial=0))
        if peak == 0 or 1 < peak < 128:
            self.err(line, f"{tag}: mask is empty (no pixel >= 128)")
        elif peak == 1:
            self.err(line, f"{tag}: mask uses values 0/1; 0/255 is expected (read as 0/1)", "warning")

    def check_orphans(self) -> None:
        for sub in DATA_DIRS:
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.resolve() not in self.referenced:
                    kind = "leftover temp file" if f.name.endswith(".tmp") else "file not referenced by any line"
                    self.err(None, f"{kind}: {sub}/{f.name} (safe to delete)", "warning")

    def check_columns(self, records: list[tuple[int, dict]]) -> None:
        """imagefolder builds one table: every line should have the same top-level keys."""
        if not records:
            return
        first_line, first = records[0]
        keys = set(first)
        for line, rec in records[1:]:
            if set(rec) != keys:
                diff = sorted(set(rec) ^ keys)
                self.err(line, f"keys differ from line {first_line} ({', '.join(diff)}); imagefolder fills them with null",
                         "warning")


def validate_dataset(root: str | Path) -> list[Problem]:
    """Every problem in the dataset at `root`, errors and warnings, in line order (dataset-wide ones last)."""
    root = Path(root)
    records, problems = read_lines(root)
    checker = _Checker(root)
    checker.problems.extend(problems)
    for line, rec in records:
        checker.check_line(line, rec)
    checker.check_columns(records)
    checker.check_orphans()
    return sorted(checker.problems, key=lambda p: (p.line is None, p.line or 0))


def errors_of(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m annotate.validate", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="dataset folder holding metadata.jsonl, images/, masks/, refs/")
    args = parser.parse_args(argv)
    problems = validate_dataset(args.dataset)
    for p in problems:
        print(p)
    n_err = len(errors_of(problems))
    n_lines = len(read_lines(Path(args.dataset))[0])
    print(f"{args.dataset}: {n_lines} samples, {n_err} errors, {len(problems) - n_err} warnings"
          + ("" if n_err else " - valid"))
    return 1 if n_err else 0


if __name__ == "__main__":
    run_cli(main)
