"""Generate tab: 1-4 reference subjects + a prompt -> one image, saved as a PNG that carries its parameters.

Besides the shared sampling controls: the references' long side (0 = the model and adapter's own), a negative prompt
with its true CFG scale, and a "randomize seed" box whose seed is reported. On ZeroGPU the handler asks for a GPU
slot sized by `gpu_seconds` (steps, image size, references, true CFG).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from multicrafter.errors import UserError

from .examples import Example
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
from .state import FOLDER_ADAPTER, ModelHolder

MAX_STEPS = 100
MAX_SEED = 2**31 - 1          # drawn seeds: short to type back, exact as a JavaScript number
MAX_REFERENCE_SIDE = 1024      # references beyond this cost a lot of tokens for no gain in identity

# ZeroGPU slot size: seconds per transformer pass at 1024x1024 (4096 image + 512 text tokens) on a ZeroGPU slice,
# with margin, plus a fixed part (text encoders, VAE, moving weights), clamped to what ZeroGPU grants.
GPU_SECONDS_PER_STEP_1024 = 0.75
GPU_OVERHEAD_SECONDS = 20
GPU_SECONDS_RANGE = (30, 300)
_TOKENS_1024 = 4096 + 512


def gpu_seconds(steps: Any, height: Any, width: Any, n_references: int, reference_long_side: Any = 0,
                true_cfg: Any = 1.0, text_tokens: int = 512) -> int:
    """ZeroGPU `duration` for one generation: the per-step cost at 1024 px scaled by the token count (mostly
    linear, attention quadratic), times steps and transformer passes (2 with true CFG), plus a fixed part; clamped
    to [30, 300]. Unreadable inputs count as the largest allowed value (the handler then refuses them anyway)."""
    def num(value: Any, default: float) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return default
        return v if math.isfinite(v) else default

    n = max(0, int(n_references))
    side = num(reference_long_side, 0) or (512 if n <= 1 else 320)   # UNO's sizes when the model decides
    tokens = (num(height, 1536) / 16) * (num(width, 1536) / 16) + text_tokens + n * (side / 16) ** 2
    r = tokens / _TOKENS_1024
    passes = 2 if num(true_cfg, 1.0) > 1 else 1
    per_step = GPU_SECONDS_PER_STEP_1024 * (0.85 * r + 0.15 * r * r)
    seconds = GPU_OVERHEAD_SECONDS + num(steps, MAX_STEPS) * passes * per_step
    low, high = GPU_SECONDS_RANGE
    return int(min(high, max(low, math.ceil(seconds))))


def draw_seed() -> int:
    """A fresh random seed in [0, MAX_SEED]."""
    return secrets.randbelow(MAX_SEED + 1)


def check_seed(seed: Any) -> int:
    """A whole number torch's generators take (0 to 2**64 - 1); empty means 0."""
    if seed is None or seed == "":
        return 0
    try:
        value = int(seed) if not isinstance(seed, float) or seed.is_integer() else None
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None or not 0 <= value < 2**64:
        raise UserError(f"seed must be a whole number from 0 to {2**64 - 1}, got {seed}")
    return value


def check_reference_side(value: Any) -> int | None:
    """The references' long side in pixels, or None (0 / empty) for the model and adapter's own sizes."""
    if value is None or value == "":
        return None
    try:
        side = float(value)
    except (TypeError, ValueError):
        raise UserError("reference long side must be a number (0 = the model's own)") from None
    if side == 0:
        return None
    if not math.isfinite(side) or side != int(side) or not 16 <= side <= MAX_REFERENCE_SIDE:
        raise UserError(f"reference long side must be 0 (the model's own) or 16 to {MAX_REFERENCE_SIDE} pixels, "
                        f"got {value}")
    return int(side)


def check_true_cfg(value: Any) -> float | None:
    """True CFG scale (1 = off), or None when not given (empty)."""
    if value is None or value == "":
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise UserError("true CFG scale must be a number (1 = off)") from None
    if not math.isfinite(scale) or scale < 1:
        raise UserError(f"true CFG scale must be at least 1 (1 = off), got {value}")
    return scale


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
                 return_attention: bool = False, progress: Any = None, label: str = "denoising",
                 reference_long_side: int | None = None, negative_prompt: str | None = None,
                 true_cfg: float | None = None):
    """One pipeline call with the app's settings; returns (output, adapter label actually used).

    `reference_long_side` replaces both long sides of the loaded adapter's reference options for this call;
    `true_cfg` (with `negative_prompt`, default empty) replaces the sampling defaults' true CFG. None keeps them."""
    import torch

    from multicrafter.presets import true_cfg_arguments  # imports diffusers: only once a run is asked for

    extra: dict[str, Any] = {}
    msl = holder.defaults()["max_sequence_length"]
    if msl:
        extra["max_sequence_length"] = msl
    if true_cfg is not None:
        extra.update(true_cfg_arguments(true_cfg, "true CFG scale", negative_prompt or ""))
    with holder.session(adapter, folder) as (pipe, adapter_on, adapter_label):
        options = None
        if reference_long_side:
            options = dataclasses.replace(pipe.reference_options, long_side_single=reference_long_side,
                                          long_side_multi=reference_long_side)
        out = pipe(prompt=prompt, reference_images=images, num_inference_steps=steps, guidance_scale=float(guidance),
                   height=height, width=width, generator=torch.Generator().manual_seed(int(seed)),
                   use_adapter=adapter_on and use_adapter, return_attention=return_attention,
                   reference_options=options, callback_on_step_end=progress_callback(progress, steps, label),
                   **extra)
    return out, (adapter_label if adapter_on and use_adapter else None)


def generate(holder: ModelHolder, output_dir: Path, refs: Any, names: list, kinds: list, prompt: str, seed: Any,
             steps: Any, guidance: Any, height: Any, width: Any, adapter: str | None, folder: str | None,
             progress: Any = None, *, reference_long_side: Any = 0, negative_prompt: str | None = "",
             true_cfg: Any = None, randomize_seed: bool = False) -> tuple[str, str, dict, str]:
    """Returns (image path, same PNG for download, parameters, notes as markdown).

    `reference_long_side` 0 keeps the model and adapter's reference sizes; `true_cfg` None is the model's own
    (`holder.defaults()`); `randomize_seed` draws the seed (reported in the notes and the parameters)."""
    from multicrafter.generation_params import save_generation

    prompt = check_prompt(prompt)
    h, w = check_size(height, width)
    steps = check_steps(steps)
    seed = draw_seed() if randomize_seed else check_seed(seed)
    side = check_reference_side(reference_long_side)
    defaults = holder.defaults()
    cfg = check_true_cfg(true_cfg)
    cfg = defaults["true_cfg"] if cfg is None else cfg
    negative = (defaults["negative_prompt"] if negative_prompt is None else negative_prompt).strip()
    images, names, kinds, notes = collect_references(refs, names, kinds)
    out, used = run_pipeline(holder, images, prompt, seed, steps, float(guidance), h, w, adapter, folder,
                             progress=progress, reference_long_side=side, negative_prompt=negative, true_cfg=cfg)
    params = dict(prompt=prompt, seed=seed, num_inference_steps=steps, guidance_scale=float(guidance),
                  true_cfg_scale=float(cfg), height=h, width=w, model=holder.name, adapter=used,
                  reference_long_side=max(max(im.size) for im in out.reference_images),
                  subjects=[dict(name=n, kind=k) for n, k in zip(names, kinds)])
    if cfg > 1:
        params["negative_prompt"] = negative
    path = output_path(Path(output_dir), f"seed{seed}")
    save_generation(out.images[0], path, params)
    lines = [f"Saved `{path.name}` (parameters embedded in the PNG, key `multicrafter`).",
             f"Seed **{seed}**" + (" (drawn at random)" if randomize_seed else "")
             + f"; references at {params['reference_long_side']} px on the long side"
             + (f"; true CFG {cfg:g}" if cfg > 1 else "")]
    if negative and cfg <= 1:
        lines.append("The negative prompt was not used: it needs a true CFG scale above 1.")
    if holder.note:
        lines.append(holder.note)
    lines += notes
    return str(path), str(path), params, "\n\n".join(lines)


def generate_gpu_seconds(references: Any, *args: Any, **kwargs: Any) -> int:
    """`gpu_seconds` for the Generate handler's own arguments (ZeroGPU calls it with them)."""
    names = ("name_1", "name_2", "name_3", "name_4", "kind_1", "kind_2", "kind_3", "kind_4", "prompt", "seed",
             "steps", "guidance", "height", "width", "adapter", "adapter_folder", "reference_long_side",
             "negative_prompt", "true_cfg", "randomize_seed")
    values = {**dict(zip(names, args)), **kwargs}
    n_refs = len(references) if isinstance(references, (list, tuple)) else 1
    return gpu_seconds(values.get("steps"), values.get("height"), values.get("width"), n_refs,
                       values.get("reference_long_side", 0), values.get("true_cfg", 1.0))


def build(holder: ModelHolder, output_dir: Path, examples: list[Example], gpu: Callable[..., Callable]
          ) -> dict[str, Any]:
    """The tab's components and events; returns the inputs the Attention tab can copy.

    `gpu(duration=...)` gives the GPU decorator (`demo.gpu_decorator`: spaces.GPU on ZeroGPU, else identity)."""
    d = holder.defaults()
    single, multi = d["reference_sizes"]
    with gr.Row():
        with gr.Column(scale=3):
            gallery, names, kinds = reference_inputs("gen")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt",
                                placeholder="e.g. a red striped circle on the left and a blue dotted square on the right")
            negative = gr.Textbox(label="Negative prompt", value=d["negative_prompt"], max_lines=2,
                                  elem_id="gen-negative-prompt",
                                  info="used with true CFG above 1 (each step then runs the model twice)")
            seed, steps, guidance, height, width, adapter, folder = sampling_controls(
                holder, MAX_STEPS, "none = base model; folder... = an adapter folder or file here, or a Hub id")
            with gr.Row():
                randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="gen-randomize-seed",
                                        info="draw a new seed for each run (shown after the run)")
                true_cfg = gr.Slider(1.0, 10.0, value=d["true_cfg"], step=0.5, label="True CFG scale",
                                     elem_id="gen-true-cfg", info="1 = off; above 1 uses the negative prompt")
                ref_side = gr.Slider(0, MAX_REFERENCE_SIDE, value=0, step=16, label="Reference long side (px)",
                                     elem_id="gen-ref-side",
                                     info=f"0 = automatic: {single} px for one reference, {multi} px for "
                                          "several (or the adapter's own)")
            run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        with gr.Column(scale=2):
            image = gr.Image(label="Result", type="filepath", format="png", interactive=False, elem_id="gen-result")
            download = gr.File(label="Download PNG (with parameters)", interactive=False)
            params = gr.JSON(label="Parameters")
            notes = gr.Markdown(holder.note, elem_id="gen-notes")

    adapter.change(lambda a: gr.update(visible=a == FOLDER_ADAPTER), adapter, folder, api_visibility="private",
                   queue=False)
    # New inputs go last, with defaults, so existing API clients keep working.
    inputs = [gallery, *names, *kinds, prompt, seed, steps, guidance, height, width, adapter, folder, ref_side,
              negative, true_cfg, randomize]
    outputs = [image, download, params, notes]

    @gpu(duration=generate_gpu_seconds)
    @ui_errors
    def _generate(references, name_1, name_2, name_3, name_4, kind_1, kind_2, kind_3, kind_4, prompt, seed, steps,
                  guidance, height, width, adapter, adapter_folder, reference_long_side=0, negative_prompt="",
                  true_cfg=None, randomize_seed=False, progress=gr.Progress()):
        return generate(holder, output_dir, references, [name_1, name_2, name_3, name_4],
                        [kind_1, kind_2, kind_3, kind_4], prompt, seed, steps, guidance, height, width, adapter,
                        adapter_folder, progress, reference_long_side=reference_long_side,
                        negative_prompt=negative_prompt, true_cfg=true_cfg, randomize_seed=randomize_seed)

    event = run.click(_generate, inputs, outputs, api_name="generate", concurrency_id="model")
    # A drawn seed is shown in the Seed box afterwards (the API returns it in the parameters).
    event.success(lambda p, r: p["seed"] if r and isinstance(p, dict) and "seed" in p else gr.skip(),
                  [params, randomize], seed, api_visibility="private", queue=False)

    if examples:
        rows = [[ex.references, *(ex.names + [""] * 4)[:4], ex.prompt, 0] for ex in examples]
        n_example_refs = max(len(ex.references) for ex in examples)

        @gpu(duration=gpu_seconds(d["steps"], d["size"], d["size"], n_example_refs, true_cfg=d["true_cfg"]))
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
