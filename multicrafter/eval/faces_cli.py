"""`python -m multicrafter.eval faces`: Hungarian Face-Sim of generated images against reference photos.

One image:   --image gen.png --ref a.png --ref b.png [--json out.json]
A whole run: --dataset DIR [--images OUT_DIR] — DIR/metadata.jsonl in the dataset format
(`multicrafter.dataset_format`): each line's `file_name` is the generated image (looked up in --images when given,
else in DIR) and its face subjects' `reference` files are the references (a plain `"refs": [...]` list also works,
so a run folder needs no masks).
Writes JSON (face_sim, matches, faces_detected, per-reference scores, notes) and prints a markdown table.
`--metrics clip_t,clip_i,dino_i,aes` (or `all`) adds the paper's other columns (prompt from --prompt or the
dataset caption); a metric whose weights are not on this machine is reported as null with a one-line note.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..dataset_format import METADATA, errors_of, read_lines
from ..errors import ArgumentParser, UserError, run_cli
from ..io import atomic_write_json, atomic_write_text, load_image
from ..metrics.defaults import (
    DEFAULT_AES_CLIP,
    DEFAULT_AES_FILE,
    DEFAULT_AES_HEAD,
    DEFAULT_CLIP,
    DEFAULT_DINO,
    IMAGE_METRICS,
    LABELS,
)
from ..metrics.face_registry import BACKENDS, DEFAULT_BACKEND, get_backend
from ..metrics.face_sim import face_similarity
from ..metrics.face_types import FaceBackend
from ..paths import resolve_inside


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line (argparse errors exit 2 with one line)."""
    p = ArgumentParser(prog="python -m multicrafter.eval faces", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="generated image")
    src.add_argument("--dataset", help="folder with metadata.jsonl (benchmark run mode)")
    p.add_argument("--ref", action="append", default=[], help="reference photo (repeat, one per person)")
    p.add_argument("--images", help="with --dataset: folder holding the generated images (default: the dataset)")
    p.add_argument("--backend", choices=list(BACKENDS), default=DEFAULT_BACKEND)
    p.add_argument("--det-threshold", type=float, help="detector score threshold (dlib HOG: 0, insightface: 0.5)")
    p.add_argument("--insightface-root", help="folder with buffalo_l/antelopev2 ONNX files (or its parent)")
    p.add_argument("--insightface-name", default="buffalo_l", help="model pack name under the root")
    p.add_argument("--insightface-detector", choices=["scrfd", "dlib"], default="scrfd")
    p.add_argument("--metrics", default="", help=f"extra metrics, comma-separated from {','.join(IMAGE_METRICS)} or all")
    p.add_argument("--prompt", help="--image mode: the prompt, for CLIP-T")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP for CLIP-T/CLIP-I: hub id or local folder")
    p.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO/DINOv2 for DINO-I: hub id or local folder")
    p.add_argument("--aes-clip", default=DEFAULT_AES_CLIP, help="CLIP ViT-L/14 under the aesthetic head")
    p.add_argument("--aes-head", default=DEFAULT_AES_HEAD, help="aesthetic head: hub repo, folder or .pth file")
    p.add_argument("--aes-head-file", default=DEFAULT_AES_FILE, help="head file name inside a repo/folder")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--markdown", help="also write the markdown table here")
    args = p.parse_args(argv)
    if args.image and not args.ref:
        p.error("--image needs at least one --ref")
    if args.dataset and args.ref:
        p.error("--ref is for --image mode; --dataset reads references from metadata.jsonl")
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    args.metrics = list(IMAGE_METRICS) if names == ["all"] else names
    bad = set(args.metrics) - set(IMAGE_METRICS)
    if bad:
        p.error(f"unknown metric(s) {', '.join(sorted(bad))}; choose from {', '.join(IMAGE_METRICS)} or all")
    if args.image and "clip_t" in args.metrics and not args.prompt:
        p.error("CLIP-T needs --prompt")
    return args


def make_backend(args: argparse.Namespace) -> FaceBackend:
    """The face backend the options ask for."""
    if args.backend == "dlib":
        return get_backend("dlib", **({"threshold": args.det_threshold} if args.det_threshold is not None else {}))
    kw: dict[str, Any] = {"root": args.insightface_root, "model_name": args.insightface_name,
                          "detector": args.insightface_detector}
    if args.det_threshold is not None:
        kw["det_threshold"] = args.det_threshold
    return get_backend("insightface", **kw)


def single_table(res: dict[str, Any], refs: list[str]) -> str:
    """Markdown table of one image's Face-Sim: one row per reference, its matched face and similarity."""
    lines = ["| reference | matched face (box) | similarity | raw |", "|---|---|---|---|"]
    by_ref = {m["reference"]: m for m in res["matches"]}
    for i, name in enumerate(refs):
        m = by_ref.get(i)
        cells = (f"{m['box']}", f"{m['similarity']:.4f}", f"{m['raw']:.4f}") if m else ("—", "0.0000", "—")
        lines.append(f"| {Path(name).name} | " + " | ".join(cells) + " |")
    lines.append(f"| **Face-Sim** | {res['faces_detected']} faces detected | **{res['face_sim']:.4f}** | |")
    return "\n".join(lines)


def metrics_table(values: dict[str, Any]) -> str:
    """Markdown table of the extra metrics ("missing" where weights were not available); "" without any."""
    rows = [f"| {LABELS[k]} | {'missing' if v is None else f'{v:.4f}'} |" for k, v in values.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else ""


def sample_metrics(models: Any, image, prompt: str, refs: list) -> dict[str, float | None]:
    """The extra metrics of one image ({} when none were asked for)."""
    if models is None:
        return {}
    from ..metrics.table import image_metrics  # imports torch and transformers: only when --metrics asks for them

    vals = image_metrics(models, [image], [prompt], [refs])
    return {k: (None if v is None else v[0]) for k, v in vals.items()}


def _inside(folder: Path, rel: Any, where: str, what: str) -> Path:
    try:
        return resolve_inside(folder, rel)
    except ValueError as exc:
        raise UserError(f"{where}: {what}: {exc}") from None


def _face_refs(row: dict, where: str, notes: list[str]) -> list[Any]:
    """A line's face references: its `refs` list, else the `reference` of each face subject (non-objects skipped)."""
    if row.get("refs"):
        if not isinstance(row["refs"], list):
            raise UserError(f"{where}: 'refs' must be a list of paths")
        return row["refs"]
    subjects = row.get("subjects") or []
    if not isinstance(subjects, list):
        raise UserError(f"{where}: 'subjects' must be a list")
    refs = []
    for k, s in enumerate(subjects):
        if not isinstance(s, dict):
            notes.append(f"{where}: subject {k} is not a JSON object, skipped")
        elif s.get("reference") and s.get("kind", "face") == "face":
            refs.append(s["reference"])
    return refs


def read_samples(dataset: Path, images: Path | None,
                 notes: list[str] | None = None) -> list[tuple[str, Path, list[Path], str]]:
    """(file_name, generated image, reference paths, caption) per line; every path stays inside its folder.

    Lines come from the dataset format's reader; images and masks are not required to exist here (the generated
    images live in `images` when given), so the strict validator is not run.
    """
    meta = dataset / METADATA
    records, problems = read_lines(dataset)
    bad = errors_of(problems)
    if bad:
        raise UserError(f"{meta}:{bad[0].line}: {bad[0].message}" if bad[0].line else f"{meta}: {bad[0].message}")
    notes = notes if notes is not None else []
    samples = []
    for n, row in records:
        where = f"{meta}:{n}"
        if "file_name" not in row:
            raise UserError(f"{where}: not a JSON object with a file_name")
        name = row["file_name"]
        refs = _face_refs(row, where, notes)
        if not refs:
            raise UserError(f"{where}: sample {name} has no face references")
        if images is None:
            image = _inside(dataset, name, where, "file_name")
        else:
            image = _inside(images, name, where, "file_name")
            if not image.exists():
                image = _inside(images, Path(image).name, where, "file_name")
        ref_paths = [_inside(dataset, r, where, "reference") for r in refs]
        samples.append((name, image, ref_paths, str(row.get("caption", ""))))
    if not samples:
        raise UserError(f"{meta} lists no samples")
    return samples


def run_dataset(args: argparse.Namespace, backend: FaceBackend,
                models: Any) -> tuple[dict[str, Any], str]:
    """Score every sample of --dataset: the JSON summary (means, per-sample rows, matches) and its markdown table."""
    notes: list[str] = []
    samples = read_samples(Path(args.dataset), Path(args.images) if args.images else None, notes)
    extra = list(models.wanted) if models else []
    head = "| sample | references | faces detected | Face-Sim |" + "".join(f" {LABELS[k]} |" for k in extra)
    rows, table = [], [head, "|---" * (4 + len(extra)) + "|"]
    for name, image_path, ref_paths, caption in samples:
        image, refs = load_image(image_path), [load_image(r) for r in ref_paths]
        res = face_similarity(image, refs, backend).to_json()
        res.update(sample_metrics(models, image, caption, refs))
        rows.append({"file_name": name, **res})
        cells = "".join(" missing |" if res[k] is None else f" {res[k]:.4f} |" for k in extra)
        table.append(f"| {name} | {len(refs)} | {res['faces_detected']} | {res['face_sim']:.4f} |" + cells)
    means = {k: (None if rows[0][k] is None else sum(r[k] for r in rows) / len(rows)) for k in ["face_sim", *extra]}
    cells = "".join(" missing |" if means[k] is None else f" **{means[k]:.4f}** |" for k in extra)
    table.append(f"| **mean** ({len(rows)} samples) | | | **{means['face_sim']:.4f}** |" + cells)
    out = {**means, "n": len(rows), "faces_detected": sum(r["faces_detected"] for r in rows),
           "matches": [{"sample": r["file_name"], **m} for r in rows for m in r["matches"]],
           "backend": backend.name, "scale": backend.scale, "samples": rows, "notes": notes}
    return out, "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    """Run `python -m multicrafter.eval faces`; returns the exit code."""
    args = parse_args(argv)
    backend = make_backend(args)
    models = None
    if args.metrics:
        from ..metrics.table import load_metric_models  # torch and transformers: only when --metrics asks for them

        models = load_metric_models(args.metrics, args.clip_model, args.dino_model, args.aes_clip, args.aes_head,
                                    args.aes_head_file)
    if args.image:
        image = load_image(args.image)
        refs = [load_image(r) for r in args.ref]
        out = {"image": args.image, "references": args.ref, **face_similarity(image, refs, backend).to_json()}
        extra = sample_metrics(models, image, args.prompt or "", refs)
        out.update(extra)
        table = "\n\n".join(t for t in (single_table(out, args.ref), metrics_table(extra)) if t)
    else:
        out, table = run_dataset(args, backend, models)
    if models is not None:
        out["missing"] = models.missing
    print(table)
    for note in out.get("notes", []):
        print(f"note: {note}")
    for key, why in (models.missing.items() if models else []):
        print(f"note: {LABELS[key]} missing: {why}")
    if args.json:
        atomic_write_json(args.json, out)
    if args.markdown:
        atomic_write_text(args.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
