"""Annotate tab: clicks/boxes -> mask (SAM 2 or GrabCut, named on screen), brush correction, subjects, caption,
reference crops, and the dataset (save, browse, delete, validate, Florence-2 auto-annotation)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from multicrafter.errors import UserError, one_line

from .inputs import KINDS, list_datasets, resolve_dataset, ui_errors

MODES = ("positive click", "negative click", "box (two corners)")
EMPTY_PROMPTS = '{"points": [], "box": null}'


class Backends:
    """The segmenter and (optional) Florence-2 grounder, each created once on first use."""

    def __init__(self, sam2: str | None = None, florence: str | None = None):
        self.sam2, self.florence = sam2, florence
        self._segmenter = None
        self._grounder = None
        self._grounder_error: str | None = None
        self._lock = threading.Lock()

    def segmenter(self):
        with self._lock:
            if self._segmenter is None:
                from annotate.segment import Segmenter

                self._segmenter = Segmenter(self.sam2)
            return self._segmenter

    def backend_line(self) -> str:
        """The backend in use and why: SAM 2 (which weights), or GrabCut with the reason SAM 2 is not in use."""
        return f"Segmentation backend: {self.segmenter().describe()}"

    def grounder(self):
        with self._lock:
            if self._grounder is None and self._grounder_error is None:
                from annotate.florence import DEFAULT_FLORENCE, FlorenceGrounder

                try:
                    self._grounder = FlorenceGrounder.from_pretrained(self.florence or DEFAULT_FLORENCE)
                except UserError as exc:
                    self._grounder_error = one_line(exc)
            if self._grounder is None:
                raise UserError(self._grounder_error)
            return self._grounder


# ---------------------------------------------------------------- clicks and masks
def parse_prompts(text: str | dict | None) -> dict[str, Any]:
    if isinstance(text, dict):
        data = text
    else:
        try:
            data = json.loads(text or EMPTY_PROMPTS)
        except json.JSONDecodeError as exc:
            raise UserError(f"clicks must be JSON like {EMPTY_PROMPTS}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"clicks must be JSON like {EMPTY_PROMPTS}")
    points = data.get("points") or []
    if not all(isinstance(p, (list, tuple)) and len(p) == 3 for p in points):
        raise UserError("each click must be [x, y, label] with label 1 (subject) or 0 (background)")
    return {"points": [list(p) for p in points], "box": data.get("box"), "corner": data.get("corner")}


def add_click(prompts: str | None, mode: str, x: float, y: float) -> str:
    """Record a click: positive/negative point, or one corner of a box (the second corner completes it)."""
    p = parse_prompts(prompts)
    if mode == MODES[2]:
        if p.get("corner"):
            (x0, y0), p["corner"] = p["corner"], None
            p["box"] = [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]
        else:
            p["corner"] = [x, y]
    else:
        p["points"].append([x, y, 0 if mode == MODES[1] else 1])
    if not p.get("corner"):
        p.pop("corner", None)
    return json.dumps(p)


def _image(image: Any) -> Image.Image:
    from multicrafter.io import load_image

    if image is None:
        raise UserError("open an image first (upload one or pick a dataset sample)")
    return load_image(image, "RGB")


def _as_mask(mask: Any, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """A mask from the UI as HxW bool at `size`. Colour composites (a painted or uploaded RGB/RGBA image) count a
    pixel when any colour channel is bright, so magenta and cyan marks both register; the threshold itself is the
    shared `as_bool_mask` (which reads only the first channel of a colour image)."""
    from multicrafter.io import load_image
    from multicrafter.masks import as_bool_mask

    if mask is None:
        return None
    if isinstance(mask, (str, Path)):
        mask = load_image(mask, mode="RGB")
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., :3].max(-1)
    m = as_bool_mask(arr)
    if size is not None and m.shape != (size[1], size[0]):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
    return m


ADD_COLOUR, REMOVE_COLOUR = "rgb(255, 0, 255)", "rgb(0, 255, 255)"


def editor_value(img: Image.Image, mask: np.ndarray | None, prompts: dict[str, Any] | None = None) -> dict:
    """The brush editor's value: the image with the mask tinted magenta and the clicks drawn, no layers.

    Gradio 6's editor does not display layers sent from the server, so the mask lives in the background and the
    user's strokes (returned as layers) are applied on top of it: magenta adds, cyan removes.
    """
    arr = np.asarray(img.convert("RGB")).astype(np.float32)
    if mask is not None:
        arr[mask] = 0.5 * arr[mask] + 0.5 * np.array([255, 0, 255], np.float32)
    bg = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(bg)
    r = max(2, min(img.size) // 80)
    for x, y, lab in (prompts or {}).get("points", []):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(40, 220, 40) if lab else (230, 40, 40), outline="white")
    box = (prompts or {}).get("box")
    if box:
        draw.rectangle(box, outline=(40, 120, 255), width=max(1, r // 2))
    return {"background": bg, "layers": [], "composite": None}


def strokes_from_editor(value: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(added, removed) bool masks at the image size from the editor's stroke layers; None when nothing is painted."""
    if not value or not value.get("layers"):
        return None
    add = np.zeros((size[1], size[0]), bool)
    remove = np.zeros_like(add)
    for layer in value["layers"]:
        if layer is None:
            continue
        arr = np.asarray(layer if not isinstance(layer, (str, Path)) else Image.open(layer).convert("RGBA"))
        if arr.ndim != 3 or arr.shape[-1] != 4:
            continue
        if arr.shape[:2] != add.shape:
            arr = np.asarray(Image.fromarray(arr, "RGBA").resize(size, Image.Resampling.NEAREST))
        painted = arr[..., 3] > 0
        cyan = arr[..., 1].astype(int) > arr[..., 0].astype(int)    # cyan (G > R) removes, magenta adds
        add |= painted & ~cyan
        remove |= painted & cyan
    return add, remove


def apply_strokes(base: Any, value: Any, size: tuple[int, int]) -> np.ndarray | None:
    """The corrected mask: (segmented mask | magenta strokes) minus cyan strokes."""
    strokes = strokes_from_editor(value, size)
    if strokes is None:
        return None
    m = _as_mask(base, size)
    m = np.zeros((size[1], size[0]), bool) if m is None else m
    add, remove = strokes
    return (m | add) & ~remove


def reference_preview(img: Image.Image, mask: np.ndarray | None, kind: str) -> Image.Image | None:
    from multicrafter.reference_crops import face_crop, reference_crop

    if mask is None or not mask.any():
        return None
    if kind == "face":
        try:
            return face_crop(img, mask=mask)
        except UserError:
            pass
    return reference_crop(img, mask)


def segment(backends: Backends, image: Any, prompts: Any, kind: str = "object"):
    """(editor value, mask 0/255, reference-crop preview, status line) for the clicks and box so far."""
    img = _image(image)
    p = parse_prompts(prompts)
    labels = [int(lab) for _, _, lab in p["points"]]
    res = backends.segmenter().segment(img, [pt[:2] for pt in p["points"]], labels, p["box"], multimask=True)
    mask = res.masks[0]
    status = backends.backend_line()
    if res.note and res.note not in status:
        status += f"\n\n{res.note}"
    status += f"\n\nmask: {int(mask.sum())} px ({mask.mean():.1%} of the image), score {float(res.scores[0]):.2f}"
    return editor_value(img, mask, p), mask.astype(np.uint8) * 255, reference_preview(img, mask, kind), status


# ---------------------------------------------------------------- dataset
def pending_table(pending: list[dict]) -> list[list[Any]]:
    return [[s["name"], s["kind"], int(np.asarray(s["mask"]).astype(bool).sum())] for s in pending or []]


def add_subject(image: Any, name: str, kind: str, mask: Any, pending: list[dict] | None) -> list[dict]:
    img = _image(image)
    m = _as_mask(mask, img.size)
    name = (name or "").strip()
    if not name:
        raise UserError("give the subject a name")
    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}")
    if m is None or not m.any():
        raise UserError("the mask is empty: click on the subject (or paint it) first")
    pending = list(pending or [])
    if any(s["name"] == name for s in pending):
        raise UserError(f"a subject named {name!r} is already in this sample")
    return pending + [dict(name=name, kind=kind, mask=m)]


def save_sample(data_dir: Path, dataset: str, sample_name: str | None, image: Any, caption: str,
                subject_name: str | None, subject_kind: str, mask: Any, pending: list[dict] | None):
    """Write the sample (pending subjects + the current mask if it is not added yet); returns (status, name)."""
    from multicrafter.dataset_format import DatasetWriter, SubjectSpec

    root = resolve_dataset(data_dir, dataset, must_exist=False)
    img = _image(image)
    subjects = list(pending or [])
    m = _as_mask(mask, img.size)
    if m is not None and m.any() and (subject_name or "").strip() and \
            not any(s["name"] == subject_name.strip() for s in subjects):
        subjects = add_subject(img, subject_name, subject_kind, m, subjects)
    if not subjects:
        raise UserError("add at least one subject (a name and a mask) before saving")
    writer = DatasetWriter(root)
    specs = [SubjectSpec(name=s["name"], kind=s["kind"], mask=s["mask"]) for s in subjects]
    name = (sample_name or "").strip() or None
    if name is not None and name in writer.names():   # an opened sample under review: replace its annotation
        sample = writer.update_sample(name, caption=caption or "", subjects=specs)
        return f"updated sample **{sample.name}** ({len(specs)} subject(s)) in `{root}`", sample.name
    sample = writer.add_sample(img, caption or "", specs, name=name)
    return f"saved sample **{sample.name}** with {len(specs)} subject(s) to `{root}`", sample.name


def browse(data_dir: Path, dataset: str):
    """(gallery items, sample names) of a dataset."""
    from multicrafter.dataset_format import DatasetWriter

    root = resolve_dataset(data_dir, dataset)
    writer = DatasetWriter(root)
    items = []
    for name in writer.names():
        s = writer.sample(name)
        items.append((str(s.image), f"{name}: {s.caption[:60]}"))
    return items, writer.names()


def open_sample(data_dir: Path, dataset: str, name: str):
    """(image path, caption, pending subjects) of a stored sample, for review or re-annotation."""
    from multicrafter.dataset_format import DatasetWriter

    if not name:
        raise UserError("pick a sample")
    s = DatasetWriter(resolve_dataset(data_dir, dataset)).sample(name)
    pending = [dict(name=sub.name, kind=sub.kind, mask=sub.load_mask()) for sub in s.subjects]
    return str(s.image), s.caption, pending


def delete_sample(data_dir: Path, dataset: str, name: str) -> str:
    from multicrafter.dataset_format import DatasetWriter

    if not name:
        raise UserError("pick a sample to delete")
    DatasetWriter(resolve_dataset(data_dir, dataset)).delete_sample(name)
    return f"deleted sample **{name}**"


def validate(data_dir: Path, dataset: str) -> str:
    from multicrafter.dataset_format import check_dataset, errors_of

    root = resolve_dataset(data_dir, dataset)
    records, problems = check_dataset(root)
    errs = errors_of(problems)
    head = f"**{dataset}**: {len(records)} sample(s), {len(errs)} error(s), {len(problems) - len(errs)} warning(s)"
    return head + ("".join(f"\n- {p}" for p in problems[:50]) if problems else " - valid")


def auto_annotate(backends: Backends, image: Any, caption: str, names: str, pending: list[dict] | None):
    """Florence-2 boxes -> segmenter masks for the given names (comma-separated) or the caption's phrases."""
    from annotate.florence import ground_subjects

    img = _image(image)
    grounder = backends.grounder()
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    found = ground_subjects(img, grounder, backends.segmenter(), names=wanted or None, caption=caption or "")
    pending = list(pending or [])
    taken = {s["name"] for s in pending}
    added = [dict(name=f.name, kind="object", mask=f.mask) for f in found if f.name not in taken]
    status = f"auto-annotation found {len(found)} subject(s): " + ", ".join(f.name for f in found) if found else \
        "auto-annotation found no subjects; annotate by clicking"
    return pending + added, status


# ---------------------------------------------------------------- UI
def build(data_dir: Path, backends: Backends) -> None:
    pending = gr.State([])
    base_mask = gr.State(None)    # the segmenter's mask; brush strokes are applied on top of it
    with gr.Row():
        dataset = gr.Dropdown(list_datasets(data_dir), value=None, allow_custom_value=True, label="Dataset",
                              info=f"a name: letters, digits, - and _ (stored in {data_dir})", elem_id="ann-dataset")
        refresh = gr.Button("Open / refresh", size="sm")
        validate_btn = gr.Button("Validate dataset", size="sm")
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image: upload, then click on the subject", type="filepath", sources=["upload"],
                             interactive=True, elem_id="ann-image", format="png")
            mode = gr.Radio(list(MODES), value=MODES[0], label="Click adds")
            prompts = gr.Textbox(value=EMPTY_PROMPTS, label="Clicks and box (image pixels; editable JSON)",
                                 max_lines=3, elem_id="ann-prompts")
            with gr.Row():
                seg_btn = gr.Button("Segment", size="sm")
                clear = gr.Button("Clear clicks", size="sm")
            backend = gr.Markdown("Segmentation backend: chosen on first use (SAM 2, downloaded on first use unless "
                                  "HF_HUB_OFFLINE=1; otherwise the GrabCut fallback, with the reason)",
                                  elem_id="ann-backend")
        with gr.Column():
            editor = gr.ImageEditor(label="Mask (magenta). Brush: magenta adds, cyan removes; the eraser undoes "
                                    "strokes", type="numpy", image_mode="RGBA", format="png", sources=[],
                                    layers=False, elem_id="ann-editor", transforms=(),
                                    brush=gr.Brush(colors=[ADD_COLOUR, REMOVE_COLOUR], default_color=ADD_COLOUR,
                                                   color_mode="fixed", default_size=6))
            mask = gr.Image(label="Current mask", type="numpy", image_mode="L", format="png", interactive=False,
                            elem_id="ann-mask", height=160)
            crop = gr.Image(label="Reference crop preview", type="pil", interactive=False, height=160)
    with gr.Row():
        subject_name = gr.Textbox(label="Subject name", max_lines=1, elem_id="ann-subject")
        subject_kind = gr.Dropdown(list(KINDS), value="object", label="Kind")
        add = gr.Button("Add subject to sample", size="sm")
        auto = gr.Button("Auto-annotate (Florence-2)", size="sm")
    subjects = gr.Dataframe(headers=["subject", "kind", "mask pixels"], label="Subjects in this sample",
                            interactive=False)
    with gr.Row():
        caption = gr.Textbox(label="Caption", lines=2, elem_id="ann-caption")
        sample_name = gr.Textbox(label="Sample name (optional)", max_lines=1)
        save = gr.Button("Save sample", variant="primary", elem_id="ann-save")
    status = gr.Markdown(elem_id="ann-status")
    with gr.Accordion("Browse samples", open=False):
        samples = gr.Gallery(label="Samples", columns=6, height=220, allow_preview=False)
        with gr.Row():
            sample_pick = gr.Dropdown([], label="Sample", allow_custom_value=True)
            open_btn = gr.Button("Open sample", size="sm")
            delete = gr.Button("Delete sample", variant="stop", size="sm")

    # clicks -> prompts -> mask
    @ui_errors
    def _click(prompts_text, mode_value, evt: gr.SelectData):
        x, y = evt.index[0], evt.index[1]
        return add_click(prompts_text, mode_value, float(x), float(y))

    @ui_errors
    def _segment(image, clicks, kind):
        p = parse_prompts(clicks)
        if not p["points"] and not p["box"]:
            return gr.skip(), gr.skip(), gr.skip(), backends.backend_line() + "\n\nclick on the subject", gr.skip()
        value, m, preview, text = segment(backends, image, clicks, kind)
        return value, m, preview, text, m

    seg_outputs = [editor, mask, crop, backend, base_mask]
    image.select(_click, [prompts, mode], prompts, api_visibility="private", queue=False).then(
        _segment, [image, prompts, subject_kind], seg_outputs, api_visibility="private")
    seg_btn.click(_segment, [image, prompts, subject_kind], seg_outputs, api_name="segment")
    clear.click(lambda: (EMPTY_PROMPTS, None, None, None, None), None, [prompts, editor, mask, crop, base_mask],
                api_visibility="private", queue=False)
    image.upload(lambda: (EMPTY_PROMPTS, None, None, None, [], None), None,
                 [prompts, editor, mask, crop, pending, base_mask],
                 api_visibility="private", queue=False).then(pending_table, pending, subjects, queue=False,
                                                             api_visibility="private")

    @ui_errors
    def _brush(value, image, kind, base):
        img = _image(image)
        m = apply_strokes(base, value, img.size)
        if m is None:
            return gr.skip(), gr.skip()
        return m.astype(np.uint8) * 255, reference_preview(img, m, kind)

    editor.input(_brush, [editor, image, subject_kind, base_mask], [mask, crop], api_visibility="private",
                 trigger_mode="always_last")

    @ui_errors
    def _add(image, name, kind, mask_value, pend):
        new = add_subject(image, name, kind, mask_value, pend)
        return new, pending_table(new), EMPTY_PROMPTS, None, None, None, f"added subject **{name}**; mark the next"

    add.click(_add, [image, subject_name, subject_kind, mask, pending],
              [pending, subjects, prompts, editor, mask, base_mask, status], api_visibility="private")

    @ui_errors
    def _save(dataset, sample_name, image, caption, subject_name, subject_kind, mask, pend):
        text, _ = save_sample(data_dir, dataset, sample_name, image, caption, subject_name, subject_kind, mask, pend)
        items, names = browse(data_dir, dataset)
        return text, [], [], items, gr.update(choices=names, value=None), gr.update(choices=list_datasets(data_dir))

    save.click(_save, [dataset, sample_name, image, caption, subject_name, subject_kind, mask, pending],
               [status, pending, subjects, samples, sample_pick, dataset], api_name="save_sample")

    @ui_errors
    def _browse(dataset):
        items, names = browse(data_dir, dataset)
        return items, gr.update(choices=names, value=names[0] if names else None), f"{len(names)} sample(s)"

    refresh.click(_browse, dataset, [samples, sample_pick, status], api_visibility="private")
    validate_btn.click(ui_errors(lambda ds: validate(data_dir, ds)), dataset, status, api_visibility="private")

    @ui_errors
    def _open(dataset, name):
        path, cap, pend = open_sample(data_dir, dataset, name)
        return (path, cap, name, pend, pending_table(pend), EMPTY_PROMPTS, None, None, None,
                f"opened **{name}** for review: saving under this name updates it")

    open_btn.click(_open, [dataset, sample_pick],
                   [image, caption, sample_name, pending, subjects, prompts, editor, mask, base_mask, status],
                   api_visibility="private")

    @ui_errors
    def _delete(dataset, name):
        text = delete_sample(data_dir, dataset, name)
        items, names = browse(data_dir, dataset)
        return text, items, gr.update(choices=names, value=None)

    delete.click(_delete, [dataset, sample_pick], [status, samples, sample_pick], api_visibility="private")

    @ui_errors
    def _auto(image, caption, names, pend):
        new, text = auto_annotate(backends, image, caption, names, pend)
        return new, pending_table(new), text

    auto.click(_auto, [image, caption, subject_name, pending], [pending, subjects, status], api_visibility="private")
