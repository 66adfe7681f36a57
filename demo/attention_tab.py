"""Attention tab: per-subject attention maps over the image, per block and per step, with bleeding scores, beside
the same seed with the adapter switched off (what MultiCrafter changes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from multicrafter.errors import UserError

from .examples import Example
from .generate_tab import MAX_STEPS, check_steps, run_pipeline
from .inputs import (
    check_prompt,
    check_size,
    collect_references,
    output_path,
    reference_inputs,
    sampling_controls,
    ui_errors,
)
from .state import FOLDER_ADAPTER, ModelHolder

ALL = "all (mean)"
TABLE_HEADERS = ["subject", "bleeding (adapter)", "bleeding (off)", "on others (adapter)", "on others (off)",
                 "max overlap (adapter)", "max overlap (off)"]


def _maps(out) -> dict[str, Any]:
    return dict(overall=out.attention_maps.float().cpu().numpy(),
                per_step=out.attention_per_step.float().cpu().numpy(),
                per_block={int(k): v.float().cpu().numpy() for k, v in (out.attention_per_block or {}).items()})


def _load_masks(files: Any) -> list[np.ndarray] | None:
    from multicrafter.io import load_image

    paths = [f if isinstance(f, str) else getattr(f, "name", None) or f.get("path") for f in (files or [])]
    return [np.asarray(load_image(p, "L")) for p in paths] or None


def run_attention(holder: ModelHolder, output_dir: Path, refs: Any, names: list, kinds: list, prompt: str, seed: Any,
                  steps: Any, guidance: Any, height: Any, width: Any, adapter: str | None, folder: str | None,
                  masks: Any = None, compare: bool = True, progress: Any = None) -> dict[str, Any]:
    """Generate with attention capture (and again with the adapter off); returns the state the views render from."""
    from multicrafter.generation_params import save_generation

    prompt = check_prompt(prompt)
    h, w = check_size(height, width)
    steps = check_steps(steps)
    seed = int(seed or 0)
    images, names, kinds, notes = collect_references(refs, names, kinds)
    mask_arrays = _load_masks(masks)
    if mask_arrays is not None and len(mask_arrays) != len(images):
        raise UserError(f"{len(mask_arrays)} masks for {len(images)} subjects: give one mask per subject, in order")
    on, used = run_pipeline(holder, images, prompt, seed, steps, guidance, h, w, adapter, folder,
                            return_attention=True, progress=progress, label="with adapter")
    params = dict(prompt=prompt, seed=seed, num_inference_steps=steps, guidance_scale=float(guidance), height=h,
                  width=w, model=holder.name, adapter=used)
    state: dict[str, Any] = dict(names=names, masks=mask_arrays, notes=notes, adapter=used, off=None, image_off=None)
    state["image_on"] = str(output_path(Path(output_dir), f"attn-seed{seed}"))
    save_generation(on.images[0], state["image_on"], params)
    state["on"] = _maps(on)
    if compare and used is not None:
        off, _ = run_pipeline(holder, images, prompt, seed, steps, guidance, h, w, adapter, folder, use_adapter=False,
                              return_attention=True, progress=progress, label="adapter off")
        state["image_off"] = str(output_path(Path(output_dir), f"attn-seed{seed}-off"))
        save_generation(off.images[0], state["image_off"], dict(params, adapter=None))
        state["off"] = _maps(off)
    elif compare:
        notes.append("No adapter is active, so there is no adapter-off run to compare with (pick a named adapter).")
    return state


def select_maps(maps: dict[str, Any], block: str | None, step: int | None) -> tuple[np.ndarray, str]:
    """The (N, h, w) maps for a view: one block (steps averaged), one step (blocks averaged), or the mean."""
    if block not in (None, "", ALL):
        k = int(block)
        if k not in maps["per_block"]:
            raise UserError(f"block {k} was not captured (captured: {sorted(maps['per_block'])})")
        view = f"double block {k}, mean over steps"
        if step:
            view += " (per-step maps are averaged over blocks, so the step slider applies to 'all' only)"
        return maps["per_block"][k], view
    if step:
        s = int(step)
        if not 1 <= s <= len(maps["per_step"]):
            raise UserError(f"step must be between 1 and {len(maps['per_step'])}")
        return maps["per_step"][s - 1], f"step {s}, mean over blocks"
    return maps["overall"], "mean over steps and blocks"


def render_view(state: dict[str, Any] | None, block: str | None = ALL, step: int | None = 0):
    """(figure with adapter, figure without, table rows, summary) for the selected block/step."""
    from PIL import Image

    from multicrafter.attention_overlay import attention_figure
    from multicrafter.bleeding import bleeding_report

    if not state:
        raise UserError("run the attention analysis first")
    names, masks = state["names"], state["masks"]
    figs, reports, summary = [], [], {}
    view = ""
    for key, img_key, label in (("on", "image_on", state["adapter"] or "no adapter"), ("off", "image_off", "off")):
        if state.get(key) is None:
            figs.append(None)
            reports.append(None)
            continue
        maps, view = select_maps(state[key], block, step)
        rep = bleeding_report(maps, masks, names)
        titles = [f"{n}\nbleeding {b:.2f}" for n, b in zip(rep.names, rep.bleeding)]
        with Image.open(state[img_key]) as im:
            figs.append(attention_figure(im.convert("RGB"), maps, titles,
                                         title=f"adapter: {label} | mean bleeding {rep.mean_bleeding:.3f}"))
        reports.append(rep)
        summary["with_adapter" if key == "on" else "adapter_off"] = dict(
            adapter=state["adapter"] if key == "on" else None, mean_bleeding=round(rep.mean_bleeding, 4),
            bleeding={n: round(float(b), 4) for n, b in zip(rep.names, rep.bleeding)},
            overlap=np.round(rep.overlap, 4).tolist(), maps=np.round(maps, 4).tolist())
    on_rep, off_rep = reports
    rows = []
    for i, row in enumerate(on_rep.rows()):
        off_row = off_rep.rows()[i] if off_rep else [None] * 4
        rows.append([row[0], row[1], off_row[1], row[2], off_row[2], row[3], off_row[3]])
    summary.update(view=view, region_source=on_rep.region_source, grid=list(on_rep.regions.shape[1:]),
                   names=names, notes=state["notes"])
    return figs[0], figs[1], rows, summary


def view_controls(state: dict[str, Any]):
    blocks = [ALL, *[str(k) for k in sorted(state["on"]["per_block"])]]
    n_steps = len(state["on"]["per_step"])
    return gr.update(choices=blocks, value=ALL), gr.update(maximum=n_steps, value=0)


def build(holder: ModelHolder, output_dir: Path, examples: list[Example], gpu: Any,
          generate_inputs: dict[str, Any]) -> None:
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=3):
            copy = gr.Button("Copy inputs from the Generate tab", size="sm")
            gallery, names, kinds = reference_inputs("attn")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="attn-prompt")
            seed, steps, guidance, height, width, adapter, folder = sampling_controls(holder, MAX_STEPS, prefix="attn")
            masks = gr.File(label="Optional subject masks (one per subject, in order) for exact bleeding regions",
                            file_count="multiple", file_types=["image"], type="filepath")
            compare = gr.Checkbox(value=True, label="Also run the same seed with the adapter off")
            run = gr.Button("Run with attention capture", variant="primary", elem_id="attn-run")
        with gr.Column(scale=4):
            with gr.Row():
                block = gr.Dropdown([ALL], value=ALL, label="Double block", elem_id="attn-block")
                step = gr.Slider(0, 1, value=0, step=1, label="Step (0 = mean over steps)", elem_id="attn-step")
            fig_on = gr.Image(label="With adapter", type="pil", format="png", interactive=False, elem_id="attn-on")
            fig_off = gr.Image(label="Same seed, adapter off", type="pil", format="png", interactive=False)
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Bleeding: attention mass outside each subject's own "
                                 "region (lower is better); overlap: histogram intersection with another subject")
            notes = gr.Markdown(elem_id="attn-notes")
            summary = gr.JSON(label="Summary")

    adapter.change(lambda a: gr.update(visible=a == FOLDER_ADAPTER), adapter, folder, api_visibility="private",
                   queue=False)
    g = generate_inputs
    copy.click(lambda *v: v, [g["gallery"], *g["names"], *g["kinds"], g["prompt"], g["seed"], g["steps"],
                              g["guidance"], g["height"], g["width"], g["adapter"], g["folder"]],
               [gallery, *names, *kinds, prompt, seed, steps, guidance, height, width, adapter, folder],
               api_visibility="private", queue=False)

    @gpu
    @ui_errors
    def _attention(references, name_1, name_2, name_3, name_4, kind_1, kind_2, kind_3, kind_4, prompt, seed, steps,
                   guidance, height, width, adapter, adapter_folder, masks, compare, progress=gr.Progress()):
        st = run_attention(holder, output_dir, references, [name_1, name_2, name_3, name_4],
                           [kind_1, kind_2, kind_3, kind_4], prompt, seed, steps, guidance, height, width, adapter,
                           adapter_folder, masks, compare, progress)
        text = "\n\n".join(([holder.note] if holder.note else []) + st["notes"])
        return (st, *render_view(st), *view_controls(st), text)

    run.click(_attention, [gallery, *names, *kinds, prompt, seed, steps, guidance, height, width, adapter, folder,
                           masks, compare],
              [state, fig_on, fig_off, table, summary, block, step, notes], api_name="attention",
              concurrency_id="model")

    @ui_errors
    def _view(st, block, step):
        return render_view(st, block, step)

    for comp in (block, step):
        comp.change(_view, [state, block, step], [fig_on, fig_off, table, summary], api_visibility="private",
                    trigger_mode="always_last")
    if examples:
        gr.Examples([[ex.references, *(ex.names + [""] * 4)[:4], ex.prompt, 0, ex.masks] for ex in examples],
                    [gallery, *names, prompt, seed, masks], label="Examples (ToyWorld scenes with their exact masks)")
