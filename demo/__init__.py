"""The Gradio app: one module per tab (generate, attention, annotate, train) over the multicrafter/annotate/train
packages, plus the job runner and the model holder. `build_app(...)` returns the Blocks; `app.py` launches it."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .state import FOLDER_ADAPTER, AppConfig, ModelHolder

__all__ = ["AppConfig", "ModelHolder", "build_app", "gpu_decorator", "launch_kwargs"]

CSS = ".gradio-container {max-width: 1400px !important}"


def gpu_decorator(duration: int | Callable[..., int] = 120) -> Callable:
    """`spaces.GPU` on Hugging Face ZeroGPU Spaces (when the `spaces` package is importable); identity otherwise.

    `duration`: seconds, or a function of the handler's arguments returning them (ZeroGPU's dynamic duration)."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def _adapter_label(holder: ModelHolder) -> str:
    """The header's adapter: its name, or the folder / LoRA file / Hub id given with --adapter."""
    choice = holder.default_adapter()
    return holder.initial_adapter if choice == FOLDER_ADAPTER and holder.initial_adapter else choice


def build_app(model: str | ModelHolder = "toy", adapter: str | None = None, config: AppConfig | None = None,
              runner: Any = None, backends: Any = None, train_modules: dict[str, str] | None = None):
    """The Blocks app. `model` is a name (toy falls back to tiny when absent) or a ready ModelHolder."""
    import gradio as gr

    from . import annotate_tab, attention_tab, generate_tab, train_tab
    from .examples import make_examples
    from .jobs import JobRunner

    cfg = config or AppConfig(model=model if isinstance(model, str) else model.name, adapter=adapter)
    holder = model if isinstance(model, ModelHolder) else ModelHolder(cfg.model, cfg.adapter or adapter, cfg.device)
    runner = runner or JobRunner()
    backends = backends or annotate_tab.Backends(cfg.sam2, cfg.florence)
    settings = train_tab.TrainSettings(runs_dir=Path(cfg.runs_dir), data_dir=Path(cfg.data_dir),
                                       enabled=cfg.train_enabled)
    if train_modules:
        settings.modules = dict(train_modules)
    examples_dir = Path(tempfile.gettempdir()) / "multicrafter-examples"
    examples = make_examples(examples_dir, size=holder.defaults()["size"] if holder.is_small else 512)
    gpu = gpu_decorator()

    with gr.Blocks(title="MultiCrafter") as demo:
        gr.Markdown("# MultiCrafter\nMulti-subject generation on FLUX with disentangled attention "
                    f"(model: **{holder.name}**{', adapter: **' + _adapter_label(holder) + '**' if holder.default_adapter() != 'none' else ''})")
        if holder.note:
            gr.Markdown(f"**Note:** {holder.note}", elem_id="model-note")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                gen_inputs = generate_tab.build(holder, Path(cfg.output_dir), examples, gpu_decorator)
            with gr.Tab("Attention", id="attention"):
                attention_tab.build(holder, Path(cfg.output_dir), examples, gpu, gen_inputs)
            with gr.Tab("Annotate", id="annotate"):
                annotate_tab.build(Path(cfg.data_dir), backends)
            with gr.Tab("Train", id="train"):
                train_tab.build(settings, runner)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.multicrafter = dict(holder=holder, runner=runner, backends=backends, settings=settings, config=cfg,
                             examples_dir=examples_dir)
    return demo


def launch_kwargs(demo: Any) -> dict[str, Any]:
    """What launch() needs to serve the app's own files (datasets, runs, outputs, examples) and nothing else."""
    info = demo.multicrafter
    cfg = info["config"]
    paths = [str(Path(p).resolve()) for p in (cfg.data_dir, cfg.runs_dir, cfg.output_dir, info["examples_dir"])]
    return dict(allowed_paths=paths, max_file_size="200mb", css=CSS)
