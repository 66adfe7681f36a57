"""Generate tab: 1-4 reference subjects + a prompt -> one image, saved as a PNG that carries its parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from multicrafter.errors import UserError

from .inputs import (
    check_prompt,
    check_size,
    collect_references,
    output_path,
    progress_callback,
    reference_inputs,
    sampling_controls,
    ui_errors,
)
from .examples import Example
from .state import FOLDER_ADAPTER, ModelHolder

MAX_STEPS = 100


def check_steps(steps: Any) -> int:
    try:
        n = int(steps)
    except (TypeError, ValueError):
        raise UserError("steps must be a whole number") from None
    if not 1 <= n <= MAX_STEPS:
        raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {n}")
    return n


def run_pipeline(holder: ModelHolder, images: list, prompt: str, seed: int, steps: int, guidance: float,
                 height: int, width: int, adapter: str | None, folder: str | None, *, use_adapter: bool = True,
                 return_attention: bool = False, progress: Any = None, label: str = "denoising"):
    """One pipeline call with the app's settings; returns (output, adapter label actually used)."""
    import torch

    extra = {}
    msl = holder.defaults()["max_sequence_length"]
    if msl:
        extra["max_sequence_length"] = msl
    with holder.session(adapter, folder) as (pipe, adapter_on, adapter_label):
        out = pipe(prompt=prompt, reference_images=images, num_inference_steps=steps, guidance_scale=float(guidance),
                   height=height, width=width, generator=torch.Generator().manual_seed(int(seed)),
                   use_adapter=adapter_on and use_adapter, return_attention=return_attention,
                   callback_on_step_end=progress_callback(progress, steps, label), **extra)
    return out, (adapter_label if adapter_on and use_adapter else None)


def generate(holder: ModelHolder, output_dir: Path, refs: Any, names: list, kinds: list, prompt: str, seed: Any,
             steps: Any, guidance: Any, height: Any, width: Any, adapter: str | None, folder: str | None,
             progress: Any = None) -> tuple[str, str, dict, str]:
    """Returns (image path, same PNG for download, parameters, notes as markdown)."""
    from multicrafter.generation_params import save_generation

    prompt = check_prompt(prompt)
    h, w = check_size(height, width)
    steps = check_steps(steps)
    seed = int(seed or 0)
    images, names, kinds, notes = collect_references(refs, names, kinds)
    out, used = run_pipeline(holder, images, prompt, seed, steps, float(guidance), h, w, adapter, folder,
                             progress=progress)
    params = dict(prompt=prompt, seed=seed, num_inference_steps=steps, guidance_scale=float(guidance),
                  true_cfg_scale=holder.defaults()["true_cfg"], height=h, width=w, model=holder.name, adapter=used, subjects=[dict(name=n, kind=k) for n, k in zip(names, kinds)])
    path = output_path(Path(output_dir), f"seed{seed}")
    save_generation(out.images[0], path, params)
    lines = [f"Saved `{path.name}` (parameters embedded in the PNG, key `multicrafter`)."]
    if holder.note:
        lines.append(holder.note)
    lines += notes
    return str(path), str(path), params, "\n\n".join(lines)


def build(holder: ModelHolder, output_dir: Path, examples: list[Example], gpu: Any) -> dict[str, Any]:
    """The tab's components and events; returns the inputs the Attention tab can copy."""
    d = holder.defaults()
    with gr.Row():
        with gr.Column(scale=3):
            gallery, names, kinds = reference_inputs("gen")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt",
                                placeholder="e.g. a red striped circle on the left and a blue dotted square on the right")
            seed, steps, guidance, height, width, adapter, folder = sampling_controls(
                holder, MAX_STEPS, "none = base model; folder... = an adapter directory on this machine")
            run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        with gr.Column(scale=2):
            image = gr.Image(label="Result", type="filepath", format="png", interactive=False, elem_id="gen-result")
            download = gr.File(label="Download PNG (with parameters)", interactive=False)
            params = gr.JSON(label="Parameters")
            notes = gr.Markdown(holder.note, elem_id="gen-notes")

    adapter.change(lambda a: gr.update(visible=a == FOLDER_ADAPTER), adapter, folder, api_visibility="private",
                   queue=False)
    inputs = [gallery, *names, *kinds, prompt, seed, steps, guidance, height, width, adapter, folder]
    outputs = [image, download, params, notes]

    @gpu
    @ui_errors
    def _generate(references, name_1, name_2, name_3, name_4, kind_1, kind_2, kind_3, kind_4, prompt, seed, steps,
                  guidance, height, width, adapter, adapter_folder, progress=gr.Progress()):
        return generate(holder, output_dir, references, [name_1, name_2, name_3, name_4],
                        [kind_1, kind_2, kind_3, kind_4], prompt, seed, steps, guidance, height, width, adapter,
                        adapter_folder, progress)

    run.click(_generate, inputs, outputs, api_name="generate", concurrency_id="model")

    if examples:
        rows = [[ex.references, *(ex.names + [""] * 4)[:4], ex.prompt, 0] for ex in examples]

        @gpu
        @ui_errors
        def _example(references, name_1, name_2, name_3, name_4, prompt, seed, progress=gr.Progress()):
            return generate(holder, output_dir, references, [name_1, name_2, name_3, name_4], [], prompt, seed,
                            d["steps"], d["guidance"], d["size"], d["size"], holder.default_adapter(),
                            holder.initial_adapter, progress)

        gr.Examples(rows, [gallery, *names, prompt, seed], outputs, fn=_example, run_on_click=True,
                    cache_examples=False, label="Examples (ToyWorld, offline: one click generates)",
                    api_visibility="private")
    return dict(gallery=gallery, names=names, kinds=kinds, prompt=prompt, seed=seed, steps=steps, guidance=guidance,
                height=height, width=width, adapter=adapter, folder=folder)
