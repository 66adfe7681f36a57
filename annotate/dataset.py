"""Read and write DESIGN §6 datasets: the Annotate tab's output and the trainer's input.

Writes are crash-safe: a sample's image, masks and references are written first (each temp file + rename) under
paths no current line references, and only then is metadata.jsonl replaced atomically. A writer killed at any point
leaves the previous, valid dataset; at worst some unreferenced files remain, which `validate` reports as warnings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multicrafter.errors import UserError
from multicrafter.io import atomic_write_text, load_image, save_image_atomic

from .crops import as_bool_mask, face_crop, mask_box, mask_to_image, reference_crop
from .validate import KINDS, METADATA, Problem, errors_of, parse_box, read_lines, resolve_inside, validate_dataset

MAX_SIDE = 4096  # longest image side the writer accepts; import_folder downscales to fit
CORE_KEYS = ("file_name", "caption", "subjects")
SUBJECT_KEYS = ("name", "kind", "mask", "reference", "box")

# Test hook: called with a stage name after each file of a save is written (crash-safety tests kill here).
FAULT_HOOK: Callable[[str], None] | None = None


class DatasetError(UserError):
    """An invalid dataset; `problems` holds every finding."""

    def __init__(self, root: Path, problems: list[Problem]):
        errs = errors_of(problems)
        shown = "; ".join(str(p) for p in errs[:3]) + ("; ..." if len(errs) > 3 else "")
        super().__init__(f"dataset {root} has {len(errs)} error(s): {shown} "
                         f"(run `python -m annotate.validate {root}` for the full list)")
        self.problems = problems


@dataclass
class Subject:
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
        return load_image(self.image)


@dataclass
class SubjectSpec:
    """What the writer needs for one subject; reference None = crop it from the image, box None = from the mask."""

    name: str
    mask: Any
    kind: str = "object"
    reference: Any = None
    box: list[float] | None = None
    extra: dict = field(default_factory=dict)


def sanitize_name(name: str) -> str:
    """A sample name safe as a file stem: letters, digits, '-' and '_' only, at most 64 characters."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_-")[:64]
    if not clean:
        raise UserError(f"invalid sample name {name!r}: use letters, digits, '-' or '_'")
    return clean


def _sample_from_record(root: Path, line: int, rec: dict) -> Sample:
    subjects = [Subject(name=s["name"], kind=s["kind"], mask=resolve_inside(root, s["mask"]),
                        reference=resolve_inside(root, s["reference"]), box=s.get("box"),
                        extra={k: v for k, v in s.items() if k not in SUBJECT_KEYS})
                for s in rec["subjects"]]
    return Sample(name=Path(rec["file_name"]).stem, image=resolve_inside(root, rec["file_name"]),
                  caption=rec["caption"], subjects=subjects, extra={k: v for k, v in rec.items() if k not in CORE_KEYS},
                  line=line, record=rec)


def load_dataset_samples(root: str | Path) -> list[Sample]:
    """All samples of a valid dataset, in file order; raises DatasetError listing the problems otherwise."""
    root = Path(root)
    problems = validate_dataset(root)
    if errors_of(problems):
        raise DatasetError(root, problems)
    records, _ = read_lines(root)
    return [_sample_from_record(root, line, rec) for line, rec in records]


def _referenced(rec: dict) -> set[str]:
    refs = {rec.get("file_name")}
    for s in rec.get("subjects") or []:
        if isinstance(s, dict):
            refs |= {s.get("mask"), s.get("reference")}
    return {r for r in refs if isinstance(r, str)}


class DatasetWriter:
    """Add, update and delete samples of one dataset folder (created if missing). One writer per folder at a time."""

    def __init__(self, root: str | Path):
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
        return [Path(r.get("file_name", "")).stem for r in self.records]

    def _index(self, name: str) -> int:
        names = self.names()
        if name not in names:
            raise UserError(f"no sample named {name!r} in {self.root}")
        return names.index(name)

    def next_name(self) -> str:
        nums = [int(n) for n in self.names() if n.isdigit()]
        return f"{(max(nums) + 1) if nums else 1:04d}"

    def sample(self, name: str) -> Sample:
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
        rec: dict = {"file_name": f"images/{name}.png", "caption": self._caption(caption)}
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
    def _fresh(folder: str, stem: str, taken: set[str]) -> str:
        """`folder/stem.png`, or `stem_v2.png`... when a current line still references it (update stays atomic)."""
        rel, n = f"{folder}/{stem}.png", 1
        while rel in taken:
            n += 1
            rel = f"{folder}/{stem}_v{n}.png"
        taken.add(rel)
        return rel

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
            mrel, rrel = self._fresh("masks", f"{name}_{k}", taken), self._fresh("refs", f"{name}_{k}", taken)
            files += [(mrel, mask_to_image(mask)), (rrel, ref)]
            out.append({"name": sname, "kind": spec.kind, "mask": mrel, "reference": rrel, "box": box, **extra})
        return out

    def _commit(self, files: list[tuple[str, Image.Image]], records: list[dict]) -> None:
        try:  # serialise before the first file is written: a bad value must not leave orphan images behind
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        except (TypeError, ValueError) as exc:
            raise UserError(f"sample metadata is not JSON-serialisable: {exc}") from None
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
                pass  # an unsafe or busy path is left alone; validate reports it as an orphan
