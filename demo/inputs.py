"""Pieces the tabs share: one-line errors for the UI, the reference-subject inputs, and where outputs are written."""

from __future__ import annotations

import functools
import inspect
import re
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from multicrafter.errors import UserError, one_line
from multicrafter.io import load_image
from multicrafter.reference_crops import subject_reference
from multicrafter.references import MAX_REFERENCES

from .state import FOLDER_ADAPTER

KINDS = ("object", "face")
MAX_INPUT_SIDE = 2048   # references larger than this are downscaled first (with a note); models use far less


def ui_errors(fn: Callable) -> Callable:
    """Turn any exception into a gr.Error with one readable line (tracebacks go to the console, not the user)."""

    def _raise(exc: Exception):
        if isinstance(exc, gr.Error):
            raise exc
        if not isinstance(exc, UserError):
            traceback.print_exc()
        raise gr.Error(one_line(exc), print_exception=False) from None

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                _raise(exc)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            _raise(exc)
    return wrapper


def reference_inputs(prefix: str) -> tuple[gr.Gallery, list[gr.Textbox], list[gr.Dropdown]]:
    """An upload gallery (1-4 images, in order) and a name + kind per slot."""
    gallery = gr.Gallery(label=f"Reference subjects (1-{MAX_REFERENCES}, in order)", type="filepath",
                         interactive=True, columns=4, height=220, elem_id=f"{prefix}-refs", format="png")
    names, kinds = [], []
    with gr.Row():
        for i in range(MAX_REFERENCES):
            with gr.Column(min_width=120):
                names.append(gr.Textbox(label=f"name {i + 1}", placeholder=f"subject {i + 1}", max_lines=1,
                                        elem_id=f"{prefix}-name-{i}"))
                kinds.append(gr.Dropdown(list(KINDS), value="object", label=f"kind {i + 1}",
                                         elem_id=f"{prefix}-kind-{i}"))
    return gallery, names, kinds


def gallery_paths(value: Any) -> list[tuple[str, str | None]]:
    """Gallery value -> [(path, caption)], accepting the shapes Gradio and direct calls use."""
    out = []
    for item in value or []:
        if isinstance(item, (tuple, list)):
            path, caption = item[0], (item[1] if len(item) > 1 else None)
        elif isinstance(item, dict):
            img = item.get("image", item)
            path, caption = (img.get("path") if isinstance(img, dict) else img), item.get("caption")
        else:
            path, caption = item, None
        out.append((path, caption))
    return out


def collect_references(gallery: Any, names: Sequence[str | None], kinds: Sequence[str | None]
                       ) -> tuple[list[Image.Image], list[str], list[str], list[str]]:
    """Load and check the references: (images, names, kinds, notes). 1-4 images; huge ones are downscaled."""
    items = gallery_paths(gallery)
    if not items:
        raise UserError(f"add 1 to {MAX_REFERENCES} reference images first")
    if len(items) > MAX_REFERENCES:
        raise UserError(f"too many reference images: {len(items)} (at most {MAX_REFERENCES})")
    images, out_names, out_kinds, notes = [], [], [], []
    for i, (src, caption) in enumerate(items):
        try:
            img = load_image(src, "RGB")
        except UserError as exc:
            raise UserError(f"reference {i + 1}: {exc}") from None
        if max(img.size) > MAX_INPUT_SIDE:
            w, h = img.size
            img = img.copy()
            img.thumbnail((MAX_INPUT_SIDE, MAX_INPUT_SIDE), Image.Resampling.LANCZOS)
            notes.append(f"reference {i + 1} is {w}x{h}; downscaled to {img.width}x{img.height}")
        name = (names[i] if i < len(names) else None) or caption or f"subject {i + 1}"
        kind = (kinds[i] if i < len(kinds) else None) or "object"
        if kind not in KINDS:
            raise UserError(f"reference {i + 1}: kind must be one of {', '.join(KINDS)}")
        if kind == "face":
            img, note = subject_reference(img, kind)
            if note:
                notes.append(f"reference {i + 1} ({name}): {note}")
        images.append(img)
        out_names.append(str(name).strip())
        out_kinds.append(kind)
    if len(set(out_names)) != len(out_names):
        raise UserError("reference names must differ from each other")
    return images, out_names, out_kinds, notes


def check_prompt(prompt: str | None) -> str:
    """The stripped prompt; an empty one is refused with a UserError."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("write a prompt first")
    return prompt


def check_size(height: Any, width: Any, unit: int = 16) -> tuple[int, int]:
    """(height, width) as integers, each a positive multiple of `unit`, else a UserError."""
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise UserError("height and width must be numbers") from None
    if h <= 0 or w <= 0 or h % unit or w % unit:
        raise UserError(f"height and width must be positive multiples of {unit}, got {h}x{w}")
    return h, w


def output_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """A new, time-stamped file name in `folder` (created) from a sanitised `stem`."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:40] or "out"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{time.time_ns() % 1_000_000:06d}{suffix}"


def progress_callback(progress: Any, steps: int, label: str = "denoising") -> Callable:
    """A diffusers `callback_on_step_end` that moves a gr.Progress bar."""

    def _cb(pipe, i, t, kwargs):
        if progress is not None:
            progress((i + 1) / max(steps, 1), desc=f"{label} {i + 1}/{steps}")
        return {}
    return _cb


DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def resolve_dataset(data_dir: Path, name: str | None, must_exist: bool = True) -> Path:
    """A dataset addressed by name under the app's data folder; names with '/', '..' etc. are refused."""
    name = (name or "").strip()
    if not name:
        raise UserError("enter a dataset name")
    if not DATASET_NAME.match(name):
        raise UserError(f"invalid dataset name {name!r}: use letters, digits, '-' or '_' (datasets live in {data_dir})")
    path = Path(data_dir) / name
    if must_exist and not (path / "metadata.jsonl").is_file():
        raise UserError(f"no dataset named {name!r} in {data_dir}")
    return path


def list_datasets(data_dir: Path) -> list[str]:
    """Names of the datasets (folders with a metadata.jsonl) under the app's data folder."""
    d = Path(data_dir)
    return sorted(p.name for p in d.iterdir() if (p / "metadata.jsonl").is_file()) if d.is_dir() else []


def sampling_controls(holder: Any, max_steps: int, adapter_info: str | None = None, prefix: str | None = None) -> tuple:
    """Seed, steps, guidance, size and adapter controls shared by the Generate and Attention tabs.

    Returns (seed, steps, guidance, height, width, adapter, folder)."""
    d = holder.defaults()
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
        steps = gr.Slider(1, max_steps, value=d["steps"], step=1, label="Steps")
        guidance = gr.Slider(0.0, 10.0, value=d["guidance"], step=0.5, label="Guidance")
    with gr.Row():
        height = gr.Slider(64, 1536, value=d["size"], step=16, label="Height")
        width = gr.Slider(64, 1536, value=d["size"], step=16, label="Width")
    with gr.Row():
        adapter = gr.Dropdown(holder.adapter_choices(), value=holder.default_adapter(), label="Adapter",
                              info=adapter_info, elem_id=f"{prefix}-adapter" if prefix else None)
        folder = gr.Textbox(label="Adapter folder, LoRA file or Hub id (owner/name)",
                            visible=holder.default_adapter() == FOLDER_ADAPTER, value=holder.initial_adapter or "",
                            max_lines=1)
    return seed, steps, guidance, height, width, adapter, folder
