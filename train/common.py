"""What pre-training and IPPO share: typed YAML configs, metrics.jsonl, atomic checkpoints, RNG state, accelerate.

Why here: both trainers must resume bit-exactly on CPU (same losses as an uninterrupted run) and never resume from a
half-written checkpoint, so checkpoint layout, RNG capture and the metrics file live in one place.

Checkpoint layout: `OUTPUT/checkpoint-{step}/state.pt` (one torch.save'd dict) plus `meta.json` written last; a
checkpoint is first written to `checkpoint-{step}.tmp-*` and renamed, so a directory named `checkpoint-{step}` with a
`meta.json` is always complete. Anything else (tmp dirs, dirs without meta.json) is ignored by `latest_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import types
import typing
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from multicrafter.errors import UserError, one_line

T = TypeVar("T")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.pt"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ configs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a type hint; UserError naming `where` on mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise UserError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected text, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise UserError(f"unknown config key '{where}' (known here: {', '.join(sorted(known))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    missing = [n for n, f in known.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        where = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise UserError(f"missing required config key '{where}'")
    try:
        return cls(**kwargs)
    except UserError as exc:
        raise UserError(f"{prefix}: {exc}" if prefix else str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad config{' section ' + prefix if prefix else ''}: {one_line(exc)}") from None


def _apply_overrides(data: dict, overrides: dict) -> dict:
    """Merge overrides into the raw YAML mapping: keys may be dotted ('train.lr') or nested dicts."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for key, value in overrides.items():
        node, parts = data, str(key).split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _apply_overrides(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None, cls: type[T], overrides: dict | None = None) -> T:
    """YAML file -> nested dataclasses `cls`, with type checks; unknown keys, wrong types and a missing file are one
    UserError line naming the key. `path=None` builds from defaults (plus overrides)."""
    import yaml

    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', None) or one_line(exc)}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise UserError(f"{p}: the config must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = _apply_overrides(data, overrides)
    try:
        return _build(cls, data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}" if path is not None else str(exc)) from None


def training_parser(prog: str, description: str, config_help: str, output_help: str):
    """The command line every training script shares: --config, --max-steps, --output-dir, --resume, --set."""
    from multicrafter.errors import ArgumentParser

    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (a checkpoint is written; the LR schedule keeps train.max_steps)")
    p.add_argument("--output-dir", default=None, help=output_help)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    return p


def parse_set_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (values parsed as YAML) -> overrides for `load_config`."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {key.strip()}: cannot parse value {value!r}") from None
    return out


def config_to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON-able data (saved beside checkpoints and in metrics headers)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ------------------------------------------------------------------------------------------------ metrics


class MetricsLogger:
    """Appends one JSON object per line to OUTPUT/metrics.jsonl, flushed and fsynced per line.

    `resume_step=None` starts a fresh file; `resume_step=k` keeps only lines with step <= k (lines a killed run wrote
    after its last checkpoint are dropped, so a resumed run's file equals an uninterrupted one's). `enabled=False`
    (non-main processes) writes nothing.
    """

    def __init__(self, output_dir: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self._fh = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self.truncate_after(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Rewrite the file keeping lines with step <= `step` (and drop a torn last line)."""
        keep = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                    keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled or self._fh is None:
            return
        self._fh.write(json.dumps(_jsonable(record), sort_keys=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """All records of OUTPUT/metrics.jsonl; a line being written (torn), a bad line or a non-object is skipped, so
    the app can read the file of a running job."""
    p = Path(output_dir) / METRICS_FILE
    out = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------ checkpoints


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (named checkpoint-N, with meta.json and state.pt), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(output_dir: str | os.PathLike, step: int, state: dict, keep_last: int = 2,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `state` (anything torch.save takes) to OUTPUT/checkpoint-{step} atomically; prune to `keep_last`.

    The temp dir is fully written and fsynced, meta.json last, then renamed; an existing checkpoint of the same step
    is moved aside first, so the name never points at a partial write. `keep_last <= 0` keeps all.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"checkpoint-{step}.tmp-", dir=root))
    try:
        torch.save(state, tmp / STATE_FILE)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / META_FILE).write_text(json.dumps({"step": step}) + "\n")
        _fsync_tree(tmp)
        if final.exists():
            old = root / f".checkpoint-{step}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for _, p in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None; temp and partial dirs never count."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | os.PathLike, resume: bool, is_main: bool = True) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run.

    Why: a second run into a folder that already holds checkpoints would interleave two runs' checkpoints and
    metrics, so without `resume` that is refused; with `resume` and nothing to resume, the run starts at step 0 (the
    main process says so)."""
    if resume:
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None and is_main:
            print(f"--resume: no complete checkpoint in {output_dir}, starting from step 0")
        return ckpt
    if list_checkpoints(output_dir):
        raise UserError(f"{output_dir} already holds checkpoints: pass --resume to continue, or choose another "
                        "--output-dir")
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / META_FILE).read_text())["step"])


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The state dict saved by `save_checkpoint` (our own files, so full unpickling is allowed)."""
    p = Path(path)
    if not (p / STATE_FILE).is_file() or not (p / META_FILE).is_file():
        raise UserError(f"{p} is not a complete checkpoint (no {STATE_FILE} or {META_FILE})")
    try:
        return torch.load(p / STATE_FILE, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a user-facing problem
        raise UserError(f"cannot read checkpoint {p}: {one_line(exc)}") from None


# ------------------------------------------------------------------------------------------------ RNG


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, numpy, torch CPU (and CUDA) RNG states, plus the named torch.Generators the trainer draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`; every named generator must be present in the saved state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise UserError(f"checkpoint has no state for random generator '{name}'")
        g.set_state(saved[name])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ accelerate


def setup_accelerator(cfg: Any = None, *, mixed_precision: str | None = None,
                      gradient_accumulation_steps: int | None = None, cpu: bool | None = None):
    """An accelerate Accelerator from a config object (attributes `mixed_precision` "no"|"bf16"|"fp16",
    `gradient_accumulation_steps`, optional `cpu`) or keywords. Single-process CPU works; `accelerate launch`
    supplies the distributed setup (DDP/FSDP) through its own config file."""
    from accelerate import Accelerator

    mp = mixed_precision or getattr(cfg, "mixed_precision", "no") or "no"
    mp = {"fp32": "no", "none": "no", "bfloat16": "bf16", "float16": "fp16"}.get(mp, mp)
    if mp not in ("no", "bf16", "fp16"):
        raise UserError(f"mixed_precision must be no, bf16 or fp16, got {mp!r}")
    force_cpu = bool(cpu if cpu is not None else getattr(cfg, "cpu", False))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        force_cpu = True  # torchrun on CPUs: accelerate only sets up gloo (MULTI_CPU) with cpu=True
    if mp == "fp16" and (force_cpu or not torch.cuda.is_available()):
        raise UserError("fp16 mixed precision needs a GPU; use bf16 or no on CPU")
    accum = gradient_accumulation_steps or getattr(cfg, "gradient_accumulation_steps", 1) or 1
    if accum < 1:
        raise UserError(f"gradient_accumulation_steps must be >= 1, got {accum}")
    if torch.cuda.is_available() and not force_cpu and os.environ.get("MULTICRAFTER_CUDNN_SDPA") != "1":
        # Measured on torch 2.11 + cuDNN 9 (H200): the cuDNN SDPA backward fails at FLUX sequence lengths
        # ("mha_graph.execute ... is_good()"); the flash / memory-efficient kernels work. MULTICRAFTER_CUDNN_SDPA=1
        # re-enables cuDNN on stacks where it is fixed.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=accum, cpu=force_cpu)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def build_model(model: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None):
    """`tiny` / `toy` / a diffusers FLUX folder or hub id -> a MultiCrafterPipeline (components as attributes:
    transformer, vae, text_encoder(_2), tokenizer(_2), scheduler; `.components` is the dict), everything frozen and in
    eval mode; the trainer unfreezes what it trains. The toy model's shipped default adapter is NOT loaded."""
    from multicrafter import MultiCrafterPipeline

    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if model == "toy":
        pipe = MultiCrafterPipeline.from_pretrained("toy", dtype=dtype, device=device)
        if pipe.adapter_name is not None:  # from_pretrained("toy") loads the default adapter: train on the base
            from multicrafter.adapters import remove_adapter

            remove_adapter(pipe.transformer)
            pipe.adapter_name = None
    else:
        pipe = MultiCrafterPipeline.from_pretrained(model, dtype=dtype, device=device)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe


# ------------------------------------------------------------------------------------------------ optimisation


@dataclass
class OptimConfig:
    """AdamW with warm-up then constant/cosine/linear decay, and gradient clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"        # constant | cosine | linear (decay after warm-up to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0        # <= 0: no clipping (the norm is still logged)
    text_encoder_lr: float | None = None   # with train.train_text_encoders: their lr (None: lr), same schedule

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine", "linear"):
            raise UserError(f"schedule must be constant, cosine or linear, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise UserError(f"lr must be > 0 and warmup_steps >= 0, got {self.lr} and {self.warmup_steps}")


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_optimizer(params: list[torch.nn.Parameter] | list[dict], cfg: OptimConfig, total_steps: int):
    """(AdamW, LambdaLR) over the trainable params, or over torch param groups (dicts with their own "lr"); the
    schedule multiplies every group's lr by the same factor."""
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    return opt, sched


class EMA:
    """Exponential moving average of trainable parameters (fp32 shadow), swapped in for validation and saving."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.999):
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]
        self._backup: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the EMA weights into the model (call `swap_out` to restore the live weights)."""
        self._backup = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._backup is not None:
            for b, p in zip(self._backup, self.params):
                p.copy_(b)
            self._backup = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise UserError("EMA state does not match the trainable parameters")
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


__all__ = [
    "EMA", "METRICS_FILE", "MetricsLogger", "OptimConfig", "build_model", "build_optimizer", "capture_rng_state",
    "checkpoint_step", "config_to_dict", "grad_norm", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_config", "lr_factor", "parse_dtype", "read_metrics", "resolve_resume", "restore_rng_state",
    "save_checkpoint", "seed_everything", "setup_accelerator",
]
