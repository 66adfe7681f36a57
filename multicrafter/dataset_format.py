"""The dataset format: what the Annotate tab and ToyWorld write and what training and evaluation read.

This docstring is the contract, and this module is its only implementation: the one reader (`read_lines`,
`load_samples`), the one writer (`DatasetWriter`, `new_dataset`, `write_metadata`, `save_mask`) and the one validator
(`validate_dataset`). Everything else in the project that touches such a folder goes through them.

Folder layout
-------------
::

    DATASET/metadata.jsonl          one JSON object per line, one line per sample
    DATASET/images/<sample>.png     the target image of each sample
    DATASET/masks/<sample>_<k>.png  mask of subject k: 8-bit single channel, the image's size, 0 = not the subject,
                                    255 = the subject
    DATASET/refs/<sample>_<k>.png   reference of subject k: a square RGB crop, any size

`<sample>` is the sample's name and the stem of its image. Names are sanitised (`sanitize_name`): letters, digits,
'-' and '_' only, at most 64 characters, so a name is a safe file name everywhere and cannot climb out of the folder.
When the subjects of a sample are replaced, the new masks and references get a `_v2`, `_v3`, ... suffix, so the old
files stay valid until the new line is in place.

One line
--------
::

    {"file_name": "images/0001.png", "caption": "a cat next to a vase",
     "subjects": [{"name": "cat", "kind": "face" | "object", "mask": "masks/0001_0.png",
                   "reference": "refs/0001_0.png", "box": [x0, y0, x1, y1]}]}

- `file_name`: the image, relative to the dataset folder; unique within the dataset.
- `caption`: the text prompt (may be empty).
- `subjects`: a list, empty for an image that is not annotated yet; subject names differ within a sample.
- `kind`: "face" (the reference is a crop around the detected face) or "object" (a crop of the masked subject on
  white). See `multicrafter.reference_crops`.
- `box`: pixels, x1/y1 exclusive: 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height. It may be null; the writer
  always fills it from the mask.
- Every path (`file_name`, `mask`, `reference`) is relative, uses '/', and has no '..', '.' or empty part; a path
  that would land outside the folder is an error (`multicrafter.paths.resolve_inside`).
- Extra keys are allowed on both levels (ToyWorld keeps its scene spec under "toyworld") and survive rewrites.
  Every line should carry the same keys: a table reader builds one schema from them.

Because `file_name` names the image and every other key is a plain column, the folder is what
`datasets.load_dataset("imagefolder", data_dir=DATASET)` expects: the image column comes from `file_name`, `caption`
and `subjects` become columns, and masks and references are paths relative to the folder.

A mask is read the same way everywhere (`multicrafter.masks.as_bool_mask`): a pixel >= 128 belongs to the subject;
a mask holding only 0 and 1 is read as 0/1 (the validator warns about it).

Writes are atomic
-----------------
Every file is written to a temporary file in its folder and renamed into place. A sample's image, masks and
references are written first, under names no current line references; only then is metadata.jsonl replaced in one
rename. A writer killed at any moment therefore leaves the previous, valid dataset: at worst some unreferenced files
remain, which the validator reports as warnings (safe to delete). A sample is never half-written. A whole dataset
made at once (`new_dataset`) is built in a temporary sibling folder and swapped in when it is complete.

Validation
----------
`validate_dataset` returns every problem as a `Problem`, whose `str()` is one line naming the metadata.jsonl line.
Errors (a missing file, a mask of the wrong size, bad JSON, ...) make `load_samples` refuse the dataset; warnings
(orphan files, blank lines, 0/1 masks, lines with differing keys) never block.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .io import atomic_write_text, load_image, save_image_atomic, staged_dir
from .masks import as_bool_mask, mask_box
from .paths import resolve_inside
from .reference_crops import face_crop, reference_crop

__all__ = [
    "CORE_KEYS", "DATA_DIRS", "KINDS", "MAX_SIDE", "METADATA", "SUBJECT_KEYS", "DatasetError", "DatasetWriter",
    "Problem", "Sample", "Subject", "SubjectSpec", "check_dataset", "errors_of", "image_file", "load_samples", "mask_file",
    "mask_to_image", "new_dataset", "parse_box", "read_lines", "reference_file", "sanitize_name", "save_mask",
    "validate_dataset", "write_metadata",
]

METADATA = "metadata.jsonl"
DATA_DIRS = ("images", "masks", "refs")
KINDS = ("face", "object")
CORE_KEYS = ("file_name", "caption", "subjects")
SUBJECT_KEYS = ("name", "kind", "mask", "reference", "box")
MAX_SIDE = 4096  # longest image side the writer accepts; annotate.import_folder downscales to fit

# Test hook: called with a file's relative path after each file of a save is written (crash-safety tests stop here).
FAULT_HOOK: Callable[[str], None] | None = None


# ------------------------------------------------------------------------------------------------ names and files


def sanitize_name(name: str) -> str:
    """A sample name safe as a file stem: letters, digits, '-' and '_' only, at most 64 characters."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_-")[:64]
    if not clean:
        raise UserError(f"invalid sample name {name!r}: use letters, digits, '-' or '_'")
    return clean


def image_file(name: str) -> str:
    """Relative path of a sample's image."""
    return f"images/{name}.png"


def mask_file(name: str, k: int) -> str:
    """Relative path of the mask of subject `k` of a sample."""
    return f"masks/{name}_{k}.png"


def reference_file(name: str, k: int) -> str:
    """Relative path of the reference of subject `k` of a sample."""
    return f"refs/{name}_{k}.png"


def mask_to_image(mask: Any) -> Image.Image:
    """A mask in its on-disk form: 8-bit single channel, 0 or 255."""
    return Image.fromarray(as_bool_mask(mask).astype(np.uint8) * 255, mode="L")


def save_mask(mask: Any, path: str | os.PathLike) -> None:
    """Write a mask (bool, 0/1 or 0-255) atomically in its on-disk form."""
    save_image_atomic(mask_to_image(mask), path)


def write_metadata(root: str | os.PathLike, records: list[dict], sort_keys: bool = False) -> None:
    """Replace `root`/metadata.jsonl with `records`, one JSON line each, in one atomic rename.

    Everything is serialised before the file is touched, so a value JSON cannot hold changes nothing.
    """
    atomic_write_text(Path(root) / METADATA, _metadata_text(records, sort_keys))


def _metadata_text(records: list[dict], sort_keys: bool = False) -> str:
    try:
        return "".join(json.dumps(r, ensure_ascii=False, sort_keys=sort_keys) + "\n" for r in records)
    except (TypeError, ValueError) as exc:
        raise UserError(f"sample metadata is not JSON-serialisable: {exc}") from None


@contextmanager
def new_dataset(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a whole dataset in a temporary sibling folder; it replaces `out` only when the block completes.

    Yields the temporary folder: write the files and `write_metadata` into it. An interrupted or failed block leaves
    the previous dataset (or nothing) in place. An existing dataset is replaced only with `overwrite`; a non-empty
    folder that holds no dataset is never touched.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"output path exists and is not a folder: {root}")
    exists = root.is_dir() and any(root.iterdir())
    if exists and not (root / METADATA).exists():
        raise UserError(f"{root} is not empty and holds no dataset (no {METADATA}); choose another folder")
    if exists and not overwrite:
        raise UserError(f"{root / METADATA} already exists (pass --overwrite to replace the dataset)")
    with staged_dir(root) as tmp:
        yield tmp
        if not (tmp / METADATA).is_file():
            raise RuntimeError(f"new_dataset: no {METADATA} was written; {root} is left as it was")


# ------------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class Problem:
    """One finding; `line` is the 1-based metadata.jsonl line, or None for dataset-wide findings."""

    line: int | None
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = f"{METADATA}:{self.line}" if self.line is not None else METADATA
        return f"{where}: {self.severity}: {self.message}"


def errors_of(problems: list[Problem]) -> list[Problem]:
    """The problems that make a dataset invalid (warnings left out)."""
    return [p for p in problems if p.severity == "error"]


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


def read_lines(root: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Parse metadata.jsonl into (line number, object) pairs; JSON and type errors become problems.

    The raw reader: it checks no keys or files. A missing folder or metadata.jsonl is a UserError.
    """
    root = Path(root)
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
        """A table reader builds one schema: every line should have the same top-level keys."""
        if not records:
            return
        first_line, first = records[0]
        keys = set(first)
        for line, rec in records[1:]:
            if set(rec) != keys:
                diff = sorted(set(rec) ^ keys)
                self.err(line, f"keys differ from line {first_line} ({', '.join(diff)}); imagefolder fills them with null",
                         "warning")


def check_dataset(root: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """metadata.jsonl read once: its parsed (line number, record) pairs and every problem in the dataset, errors and
    warnings, in line order (dataset-wide ones last)."""
    root = Path(root)
    records, problems = read_lines(root)
    checker = _Checker(root)
    checker.problems.extend(problems)
    for line, rec in records:
        checker.check_line(line, rec)
    checker.check_columns(records)
    checker.check_orphans()
    return records, sorted(checker.problems, key=lambda p: (p.line is None, p.line or 0))


def validate_dataset(root: str | os.PathLike) -> list[Problem]:
    """Every problem in the dataset at `root` (see `check_dataset`)."""
    return check_dataset(root)[1]


class DatasetError(UserError):
    """An invalid dataset; `problems` holds every finding."""

    def __init__(self, root: Path, problems: list[Problem]):
        errs = errors_of(problems)
        shown = "; ".join(str(p) for p in errs[:3]) + ("; ..." if len(errs) > 3 else "")
        super().__init__(f"dataset {root} has {len(errs)} error(s): {shown} "
                         f"(run `python -m annotate.validate {root}` for the full list)")
        self.problems = problems


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Subject:
    """One subject of a sample, with its paths resolved inside the dataset; `extra` holds keys beyond the schema."""

    name: str
    kind: str
    mask: Path
    reference: Path
    box: list[float] | None = None
    extra: dict = field(default_factory=dict)

    def load_mask(self) -> np.ndarray:
        """HxW bool, thresholded the same way everywhere (>= 128, or >= 1 for a 0/1 mask)."""
        with Image.open(self.mask) as m:
            return as_bool_mask(m)

    def load_reference(self) -> Image.Image:
        """The reference crop as an RGB image."""
        return load_image(self.reference)


@dataclass
class Sample:
    """One metadata line, with paths resolved inside the dataset; `record` is the line exactly as stored."""

    name: str
    image: Path
    caption: str
    subjects: list[Subject]
    extra: dict
    line: int
    record: dict

    def load_image(self) -> Image.Image:
        """The target image as RGB."""
        return load_image(self.image)


def _sample_from_record(root: Path, line: int, rec: dict) -> Sample:
    subjects = [Subject(name=s["name"], kind=s["kind"], mask=resolve_inside(root, s["mask"]),
                        reference=resolve_inside(root, s["reference"]), box=s.get("box"),
                        extra={k: v for k, v in s.items() if k not in SUBJECT_KEYS})
                for s in rec["subjects"]]
    return Sample(name=Path(rec["file_name"]).stem, image=resolve_inside(root, rec["file_name"]),
                  caption=rec["caption"], subjects=subjects, extra={k: v for k, v in rec.items() if k not in CORE_KEYS},
                  line=line, record=rec)


def load_samples(root: str | os.PathLike) -> list[Sample]:
    """All samples of a valid dataset, in file order; raises DatasetError listing the problems otherwise."""
    root = Path(root)
    records, problems = check_dataset(root)
    if errors_of(problems):
        raise DatasetError(root, problems)
    return [_sample_from_record(root, line, rec) for line, rec in records]


# ------------------------------------------------------------------------------------------------ writing samples


@dataclass
class SubjectSpec:
    """What the writer needs for one subject; reference None = crop it from the image, box None = from the mask."""

    name: str
    mask: Any
    kind: str = "object"
    reference: Any = None
    box: list[float] | None = None
    extra: dict = field(default_factory=dict)


def _referenced(rec: dict) -> set[str]:
    refs = {rec.get("file_name")}
    for s in rec.get("subjects") or []:
        if isinstance(s, dict):
            refs |= {s.get("mask"), s.get("reference")}
    return {r for r in refs if isinstance(r, str)}


class DatasetWriter:
    """Add, update and delete samples of one dataset folder (created if missing). One writer per folder at a time."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"dataset path is a file, not a folder: {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if (self.root / METADATA).exists():
            records, problems = read_lines(self.root)
            if errors_of(problems):
                raise DatasetError(self.root, problems)
            self.records = [rec for _, rec in records]

    # ---- queries -------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Sample names in file order."""
        return [Path(r.get("file_name", "")).stem for r in self.records]

    def _index(self, name: str) -> int:
        names = self.names()
        if name not in names:
            raise UserError(f"no sample named {name!r} in {self.root}")
        return names.index(name)

    def next_name(self) -> str:
        """The next free numeric name (0001, 0002, ...)."""
        nums = [int(n) for n in self.names() if n.isdigit()]
        return f"{(max(nums) + 1) if nums else 1:04d}"

    def sample(self, name: str) -> Sample:
        """The sample called `name`, as `load_samples` would return it."""
        i = self._index(name)
        return _sample_from_record(self.root, i + 1, self.records[i])

    # ---- writes --------------------------------------------------------------------------------------------------
    def add_sample(self, image: Any, caption: str, subjects: list[SubjectSpec], name: str | None = None,
                   extra: dict | None = None) -> Sample:
        """Write a new sample; everything is checked before the first byte is written."""
        name = sanitize_name(name) if name is not None else self.next_name()
        if name in self.names():
            raise UserError(f"a sample named {name!r} already exists; use update or choose another name")
        img = load_image(image)
        if max(img.size) > MAX_SIDE:
            raise UserError(f"image is {img.width}x{img.height}; downscale it to at most {MAX_SIDE} px per side first")
        rec: dict = {"file_name": image_file(name), "caption": self._caption(caption)}
        taken = self._taken()
        if rec["file_name"] in taken:
            raise UserError(f"{rec['file_name']} is already used by another sample")
        files: list[tuple[str, Image.Image]] = [(rec["file_name"], img)]
        rec["subjects"] = self._prepare_subjects(name, img, subjects, taken, files)
        rec.update(self._extra(extra))
        self._commit(files, self.records + [rec])
        return self.sample(name)

    def update_sample(self, name: str, caption: str | None = None, subjects: list[SubjectSpec] | None = None,
                      extra: dict | None = None) -> Sample:
        """Change caption, subjects or extra keys of a sample (the image stays; to replace it, delete and add)."""
        i = self._index(name)
        old = self.records[i]
        rec = dict(old)
        if caption is not None:
            rec["caption"] = self._caption(caption)
        files: list[tuple[str, Image.Image]] = []
        if subjects is not None:
            img = load_image(resolve_inside(self.root, old["file_name"]))
            rec["subjects"] = self._prepare_subjects(name, img, subjects, self._taken(), files)
        rec.update(self._extra(extra))
        records = list(self.records)
        records[i] = rec
        self._commit(files, records)
        self._remove_unreferenced(_referenced(old))
        return self.sample(name)

    def delete_sample(self, name: str) -> None:
        """Drop the line first, then its files; a crash in between leaves only orphan files (warnings)."""
        i = self._index(name)
        old = self.records[i]
        self._commit([], self.records[:i] + self.records[i + 1:])
        self._remove_unreferenced(_referenced(old))

    # ---- internals -----------------------------------------------------------------------------------------------
    @staticmethod
    def _caption(caption: Any) -> str:
        if not isinstance(caption, str):
            raise UserError("caption must be text")
        return caption.strip()

    @staticmethod
    def _extra(extra: dict | None) -> dict:
        extra = dict(extra or {})
        clash = [k for k in extra if k in CORE_KEYS]
        if clash:
            raise UserError(f"extra keys may not replace {', '.join(clash)}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise UserError(f"extra keys must be JSON-serialisable: {exc}") from None
        return extra

    def _taken(self) -> set[str]:
        out: set[str] = set()
        for r in self.records:
            out |= _referenced(r)
        return out

    @staticmethod
    def _fresh(rel: str, taken: set[str]) -> str:
        """`rel`, or `<stem>_v2.png`... when a current line still references it (so an update stays atomic)."""
        stem, n, out = rel[: -len(".png")], 1, rel
        while out in taken:
            n += 1
            out = f"{stem}_v{n}.png"
        taken.add(out)
        return out

    def _prepare_subjects(self, name: str, img: Image.Image, subjects: list[SubjectSpec], taken: set[str],
                          files: list[tuple[str, Image.Image]]) -> list[dict]:
        out, seen = [], set()
        for k, spec in enumerate(subjects):
            sname = str(spec.name).strip()
            if not sname:
                raise UserError(f"subject {k} needs a name")
            if sname in seen:
                raise UserError(f"two subjects are named {sname!r}; subject names must differ within a sample")
            seen.add(sname)
            if spec.kind not in KINDS:
                raise UserError(f"subject {sname!r}: kind must be one of {', '.join(KINDS)}")
            mask = as_bool_mask(spec.mask)
            if mask.shape != (img.height, img.width):
                raise UserError(f"subject {sname!r}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                f"{img.width}x{img.height}")
            if not mask.any():
                raise UserError(f"subject {sname!r}: mask is empty; draw or click the subject first")
            try:
                box = parse_box(spec.box if spec.box is not None else mask_box(mask), img.size)
            except ValueError as exc:
                raise UserError(f"subject {sname!r}: {exc}") from None
            extra = {key: v for key, v in dict(spec.extra or {}).items() if key not in SUBJECT_KEYS}
            try:
                json.dumps(extra)
            except (TypeError, ValueError) as exc:
                raise UserError(f"subject {sname!r}: extra keys must be JSON-serialisable: {exc}") from None
            if spec.reference is not None:
                ref = load_image(spec.reference)
            elif spec.kind == "face":
                ref = face_crop(img, mask=mask)
            else:
                ref = reference_crop(img, mask)
            mrel, rrel = self._fresh(mask_file(name, k), taken), self._fresh(reference_file(name, k), taken)
            files += [(mrel, mask_to_image(mask)), (rrel, ref)]
            out.append({"name": sname, "kind": spec.kind, "mask": mrel, "reference": rrel, "box": box, **extra})
        return out

    def _commit(self, files: list[tuple[str, Image.Image]], records: list[dict]) -> None:
        text = _metadata_text(records)  # before the first file is written: a bad value must leave no orphan files
        for rel, im in files:
            save_image_atomic(im, resolve_inside(self.root, rel))
            if FAULT_HOOK is not None:
                FAULT_HOOK(rel)
        atomic_write_text(self.root / METADATA, text)
        if FAULT_HOOK is not None:
            FAULT_HOOK(METADATA)
        self.records = records

    def _remove_unreferenced(self, candidates: set[str]) -> None:
        still = self._taken()
        for rel in candidates - still:
            try:
                resolve_inside(self.root, rel).unlink(missing_ok=True)
            except (ValueError, OSError):
                pass  # an unsafe or busy path is left alone; the validator reports it as an orphan
