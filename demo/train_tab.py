"""Train tab: start pre-training or IPPO as a subprocess (`python -m train.pretrain|train.ippo --config ...`), stream
its log, plot metrics.jsonl live, stop it (whole process group), resume it, and browse past runs with their samples.

The tab only writes a config copy into the run folder and builds the documented command line; everything else is
the trainers' own CLI, so a run started here is exactly reproducible from a shell with the command in job.json.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from multicrafter.errors import UserError
from train.metrics_log import read_metrics

from .inputs import list_datasets, resolve_dataset, ui_errors
from .jobs import JOB_NAME, LOG_NAME, Job, JobRunner, python_module_argv

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = {"pretrain": "train.pretrain", "ippo": "train.ippo"}
PLOT_KEYS = {
    "pretrain": ["loss", "loss_diff", "loss_attn", "lr", "grad_norm", "moe_aux"],
    "ippo": ["reward", "reward_text", "reward_aes", "reward_id", "ratio_mean", "ratio_first", "clip_frac",
             "approx_kl", "window_start"],
}
SKIP_KEYS = {"step", "sec_per_step", "time", "epoch"}
DISABLED = "training is disabled on this server (--no-train, a Space, or a network --host without --train)"


@dataclass
class TrainSettings:
    runs_dir: Path
    data_dir: Path
    configs_dir: Path = REPO_ROOT / "train" / "configs"
    enabled: bool = True
    modules: dict[str, str] = field(default_factory=lambda: dict(MODES))   # tests may point these at stand-ins


# ---------------------------------------------------------------- configs and runs
def _has_source(section: Any) -> bool:
    return isinstance(section, dict) and ("dataset" in section or "toyworld" in section)


def config_stage(cfg: Any) -> str | None:
    """The Train-tab stage a parsed config belongs to, read from its content (never its file name).

    `ippo`: it has a `prompts:` section with a source (`dataset` or `toyworld`), which only IPPO reads.
    `pretrain`: it has a `data:` section with a source and trains an adapter (`train.mode` adapter, the default).
    None: anything else (base-model and VAE stages, accelerate's launcher configs), which the tab does not list.
    """
    if not isinstance(cfg, dict):
        return None
    if _has_source(cfg.get("prompts")):
        return "ippo"
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    if _has_source(cfg.get("data")) and train.get("mode", "adapter") == "adapter":
        return "pretrain"
    return None


def list_configs(settings: TrainSettings, mode: str) -> list[str]:
    """The YAML files directly in configs_dir whose content belongs to `mode` (see `config_stage`); sub-folders such
    as configs/recipe/ and unreadable files are left out."""
    if not Path(settings.configs_dir).is_dir():
        return []
    out = []
    for path in sorted(Path(settings.configs_dir).glob("*.yaml")):
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if config_stage(cfg) == mode:
            out.append(path.name)
    return out


def read_config(settings: TrainSettings, name: str) -> str:
    if not name:
        return ""
    path = Path(settings.configs_dir) / Path(name).name
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    return path.read_text()


def _parse_yaml(text: str) -> dict:
    try:
        cfg = yaml.safe_load(text or "")
    except yaml.YAMLError as exc:
        raise UserError(f"the config is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise UserError("the config must be a YAML mapping (sections like model:, data:, train:)")
    return cfg


def refuse_custom_reward(cfg: dict) -> None:
    """`reward.kind: module:callable` imports and runs arbitrary code on the server: allowed from a shell, not from
    a web form."""
    reward = cfg.get("reward")
    kind = reward.get("kind") if isinstance(reward, dict) else None
    if isinstance(kind, str) and ":" in kind:
        raise UserError(f"reward.kind {kind!r} (module:callable) runs code from the server's Python path and cannot "
                        "be used from the app; use kind toy or real here, or start the run from a shell")


def apply_fields(cfg: dict, dataset: Path | None = None, lr: float | None = None,
                 attention_weight: float | None = None) -> dict:
    """Set the key fields the form edits: the dataset (replacing a ToyWorld source), lr, the Dice weight λ."""
    if dataset is not None:
        section = next((v for v in cfg.values() if isinstance(v, dict) and ("dataset" in v or "toyworld" in v)), None)
        if section is None:
            raise UserError("this config has no data section with a 'dataset' field; edit the YAML instead")
        section.pop("toyworld", None)
        section["dataset"] = str(dataset.resolve())
    if lr is not None:
        if lr <= 0:
            raise UserError(f"learning rate must be positive, got {lr}")
        cfg.setdefault("optim", {})["lr"] = float(lr)
    if attention_weight is not None:
        if "attention_loss" not in cfg:
            raise UserError("this config has no attention_loss section (the Dice weight applies to pre-training)")
        if attention_weight < 0:
            raise UserError(f"the Dice weight must be >= 0, got {attention_weight}")
        cfg["attention_loss"]["weight"] = float(attention_weight)
    return cfg


def run_folder(settings: TrainSettings, mode: str, config: str, run_name: str | None) -> Path:
    name = (run_name or "").strip()
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
        raise UserError(f"invalid run name {name!r}: use letters, digits, '-' or '_'")
    name = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{mode}-{Path(config).stem}"
    path = Path(settings.runs_dir).resolve() / name
    if path.exists():
        raise UserError(f"a run named {name!r} already exists; pick another name or resume it")
    return path


def _optional_float(value: Any, what: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number (or blank for the config's), got {value!r}") from None


def prepare_run(settings: TrainSettings, mode: str, config: str, config_text: str, max_steps: Any = None,
                dataset: str | None = None, run_name: str | None = None, lr: Any = None,
                attention_weight: Any = None) -> tuple[list[str], Path, dict]:
    """Validate the form, write the run's config copy; returns (argv, run folder, job metadata)."""
    if not settings.enabled:
        raise UserError(DISABLED)
    if mode not in settings.modules:
        raise UserError(f"mode must be one of {', '.join(settings.modules)}")
    cfg = _parse_yaml(config_text or read_config(settings, config))
    refuse_custom_reward(cfg)
    ds = resolve_dataset(settings.data_dir, dataset) if (dataset or "").strip() else None
    cfg = apply_fields(cfg, ds, _optional_float(lr, "learning rate"), _optional_float(attention_weight, "Dice weight"))
    steps = int(max_steps) if max_steps not in (None, "") else 0
    if steps < 0:
        raise UserError(f"max steps must be >= 0 (0 = the config's), got {steps}")
    run_dir = run_folder(settings, mode, config or "custom", run_name)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = python_module_argv(settings.modules[mode], "--config", str(run_dir / "config.yaml"),
                              "--output-dir", str(run_dir))
    if steps:
        argv += ["--max-steps", str(steps)]
    return argv, run_dir, dict(mode=mode, config=config, dataset=str(ds) if ds else None)


def list_runs(settings: TrainSettings) -> list[str]:
    d = Path(settings.runs_dir)
    if not d.is_dir():
        return []
    runs = [p for p in d.iterdir() if p.is_dir() and ((p / JOB_NAME).is_file() or (p / "metrics.jsonl").is_file())]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def run_path(settings: TrainSettings, name: str) -> Path:
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name) or ".." in name:
        raise UserError("pick a run from the list")
    path = Path(settings.runs_dir).resolve() / name
    if not path.is_dir():
        raise UserError(f"no run named {name!r} in {settings.runs_dir}")
    return path


def resume_argv(settings: TrainSettings, name: str) -> tuple[list[str], Path, dict]:
    if not settings.enabled:
        raise UserError(DISABLED)
    run_dir = run_path(settings, name)
    info_path = run_dir / JOB_NAME
    if not info_path.is_file():
        raise UserError(f"run {name!r} was not started from this app (no {JOB_NAME}); resume it from a shell")
    info = json.loads(info_path.read_text())
    if (run_dir / "config.yaml").is_file():   # the copy may have been edited since the run started
        refuse_custom_reward(_parse_yaml((run_dir / "config.yaml").read_text()))
    argv = [a for a in info["argv"] if a != "--resume"] + ["--resume"]
    return argv, run_dir, dict(info, resumed=True)


# ---------------------------------------------------------------- metrics and samples
def metrics_figure(records: list[dict], mode: str | None = None, title: str = ""):
    """Curves of the trainers' documented keys (docs/training.md) first, then any other numeric key; one panel per key."""
    from matplotlib.figure import Figure

    numeric = [k for k in dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, (int, float)))
               if k not in SKIP_KEYS]
    preferred = PLOT_KEYS.get(mode or "", []) + [k for keys in PLOT_KEYS.values() for k in keys]
    keys = [k for k in dict.fromkeys(preferred) if k in numeric] + [k for k in numeric if k not in preferred]
    keys = keys[:9]
    cols = 3
    rows = max(1, -(-len(keys) // cols))
    fig = Figure(figsize=(9, 2.4 * rows), dpi=80)
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
        ax.axis("off")
        return fig
    for i, k in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = [(r.get("step", j), r[k]) for j, r in enumerate(records) if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(k, fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def run_images(run_dir: Path, limit: int = 12) -> list[tuple[str, str]]:
    pngs = [p for p in Path(run_dir).rglob("*.png") if "toyworld" not in p.parts and p.parent.name != "images"]
    pngs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [(str(p), str(p.relative_to(run_dir))) for p in pngs[:limit]]


def run_summary(settings: TrainSettings, name: str):
    """(figure, log tail, sample images, status) of a past run."""
    run_dir = run_path(settings, name)
    info = json.loads((run_dir / JOB_NAME).read_text()) if (run_dir / JOB_NAME).is_file() else {}
    recs = read_metrics(run_dir)
    log = (run_dir / LOG_NAME).read_text(errors="replace").splitlines()[-200:] if (run_dir / LOG_NAME).is_file() \
        else []
    last = recs[-1] if recs else {}
    status = f"**{name}** ({info.get('mode', '?')}): {len(recs)} logged step(s)" + \
        (f", last step {last.get('step')}" if last else "")
    return metrics_figure(recs, info.get("mode"), name), "\n".join(log), run_images(run_dir), status


# ---------------------------------------------------------------- streaming
def stream(runner: JobRunner, job: Job, mode: str | None) -> Iterator[tuple[str, Any, str]]:
    """(log tail, metrics figure, status) whenever the job printed something, until it ends."""
    for j in runner.follow(job):
        recs = read_metrics(j.run_dir)
        yield j.tail(200), metrics_figure(recs, mode, j.run_dir.name), j.status()


def start(settings: TrainSettings, runner: JobRunner, mode: str, config: str, config_text: str, max_steps: Any,
          dataset: str | None, run_name: str | None, lr: Any = None, attention_weight: Any = None):
    if runner.running:   # refuse before a new run folder is written
        raise UserError(f"a training job is already running ({runner.job.run_dir.name}); stop it first")
    argv, run_dir, meta = prepare_run(settings, mode, config, config_text, max_steps, dataset, run_name, lr,
                                      attention_weight)
    job = runner.start(argv, run_dir, cwd=REPO_ROOT, meta=meta)
    return job, meta


def build(settings: TrainSettings, runner: JobRunner) -> None:
    if not settings.enabled:
        gr.Markdown("**Training is disabled on this server** (`--no-train`, `MULTICRAFTER_DISABLE_TRAIN=1`, a Space, "
                    "or a network `--host` without `--train`). Run `python app.py` locally to train.",
                    elem_id="train-disabled")
    with gr.Row():
        with gr.Column(scale=2):
            mode = gr.Radio(list(settings.modules), value="pretrain", label="Stage", elem_id="train-mode")
            configs = list_configs(settings, "pretrain")
            default = "tiny_pretrain.yaml" if "tiny_pretrain.yaml" in configs else (configs[0] if configs else None)
            config = gr.Dropdown(configs, value=default, label="Config (train/configs)", elem_id="train-config")
            config_text = gr.Code(read_config(settings, default) if default else "", language="yaml",
                                  label="Config (edit freely; a copy is saved in the run folder)", lines=12,
                                  max_lines=18)
            with gr.Row():
                max_steps = gr.Number(value=0, precision=0, label="Max steps (0 = config)", minimum=0)
                lr = gr.Textbox(value="", label="Learning rate (blank = config)", max_lines=1)
                attn_w = gr.Textbox(value="", label="Dice weight λ (blank = config)", max_lines=1)
            with gr.Row():
                dataset = gr.Dropdown(list_datasets(settings.data_dir), value=None, allow_custom_value=True,
                                      label="Dataset (blank = the config's)", elem_id="train-dataset")
                run_name = gr.Textbox(label="Run name (optional)", max_lines=1)
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="train-start",
                                      interactive=settings.enabled)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
                follow_btn = gr.Button("Follow running job", size="sm")
        with gr.Column(scale=3):
            status = gr.Markdown("no job running", elem_id="train-status")
            plot = gr.Plot(label="Metrics (metrics.jsonl)")
            log = gr.Textbox(label="Log", lines=16, max_lines=16, autoscroll=True, elem_id="train-log")
    with gr.Accordion("Past runs", open=False):
        with gr.Row():
            runs = gr.Dropdown(list_runs(settings), label="Run", allow_custom_value=True)
            refresh = gr.Button("Refresh", size="sm")
            show = gr.Button("Show", size="sm")
            resume = gr.Button("Resume", size="sm", interactive=settings.enabled)
        images = gr.Gallery(label="Samples of the run", columns=6, height=220)

    def _configs(m):
        cs = list_configs(settings, m)
        pick = next((c for c in cs if c.startswith("tiny")), cs[0] if cs else None)
        return gr.update(choices=cs, value=pick), read_config(settings, pick) if pick else ""

    mode.change(_configs, mode, [config, config_text], api_visibility="private", queue=False)
    config.change(ui_errors(lambda c: read_config(settings, c)), config, config_text, api_visibility="private",
                  queue=False)

    @ui_errors
    def _start(mode, config, config_text, max_steps, dataset, run_name, lr, attention_weight):
        job, meta = start(settings, runner, mode, config, config_text, max_steps, dataset, run_name, lr,
                          attention_weight)
        yield from stream(runner, job, mode)

    outs = [log, plot, status]
    start_btn.click(_start, [mode, config, config_text, max_steps, dataset, run_name, lr, attn_w], outs,
                    api_name="train_start", concurrency_limit=4, concurrency_id="train")

    @ui_errors
    def _stop():
        job = runner.job
        if not runner.stop():
            return "no job is running"
        return f"stopped: {job.status()} - no process of its group is left"

    stop_btn.click(_stop, None, status, api_name="train_stop", concurrency_limit=None)

    @ui_errors
    def _follow():
        if runner.job is None:
            raise UserError("no job has been started from this app")
        info = json.loads((runner.job.run_dir / JOB_NAME).read_text())
        yield from stream(runner, runner.job, info.get("mode"))

    follow_btn.click(_follow, None, outs, api_visibility="private", concurrency_limit=4, concurrency_id="train")

    @ui_errors
    def _resume(name):
        argv, run_dir, meta = resume_argv(settings, name)
        job = runner.start(argv, run_dir, cwd=REPO_ROOT, meta=meta)
        yield from stream(runner, job, meta.get("mode"))

    resume.click(_resume, runs, outs, api_visibility="private", concurrency_limit=4, concurrency_id="train")
    refresh.click(lambda: gr.update(choices=list_runs(settings)), None, runs, api_visibility="private", queue=False)

    @ui_errors
    def _show(name):
        fig, text, imgs, st = run_summary(settings, name)
        return fig, text, imgs, st

    show.click(_show, runs, [plot, log, images, status], api_visibility="private")
