"""What the app holds between requests: its settings, the one model (loaded lazily, once) and adapter switching.

The model is loaded in a background thread at launch so the page is up at once and the first generation only waits
for whatever is left of the load. Requests share one pipeline, so adapter switches and generation happen under one
lock (the queue's concurrency limit is 1 for model events anyway; the lock makes direct calls safe too).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multicrafter.errors import UserError, one_line

NO_ADAPTER = "none"
FOLDER_ADAPTER = "folder..."


def env_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class AppConfig:
    """Everything `python app.py` can set (flags, or MULTICRAFTER_* environment variables on Spaces)."""

    model: str = "toy"
    adapter: str | None = None
    data_dir: Path = Path("datasets")     # Annotate/Train datasets live here, addressed by name
    runs_dir: Path = Path("runs")         # training runs started from the Train tab
    output_dir: Path = Path("outputs")    # generated PNGs
    train_enabled: bool = True
    sam2: str | None = None               # SAM 2 hub id or folder (default facebook/sam2.1-hiera-tiny), or "grabcut"
    florence: str | None = None           # Florence-2 hub id or folder for auto-annotation (hub ids: downloaded on
                                          # first use unless HF_HUB_OFFLINE=1)
    device: str | None = None
    quantize: str = "none"                # none|int8|fp8|nf4 (transformer and T5 weights)
    offload: str = "none"                 # none|model|sequential CPU offload (CUDA)
    extra: dict[str, Any] = field(default_factory=dict)


def toy_available() -> bool:
    from multicrafter import presets

    return (presets.TOY_DIR / "model_index.json").is_file()


def resolve_model(requested: str | None) -> tuple[str, str]:
    """(model to load, note for the user). `toy` falls back to `tiny` (random weights) when it is not installed."""
    name = (requested or "toy").strip() or "toy"
    if name == "toy" and not toy_available():
        from multicrafter import presets

        return "tiny", (f"The embedded toy model is not installed ({presets.TOY_DIR} is missing); fell back to "
                        "'tiny' (random weights): images will be noise.")
    return name, ""


def _model_folder(name: str) -> Path:
    """The folder a model name stands for before it is loaded: the toy's, or the name itself (a hub id's is absent)."""
    from multicrafter import presets

    return presets.TOY_DIR if name == "toy" else Path(name)


def _folder_adapters(name: str) -> list[str]:
    """Named adapters of a model not loaded yet: sub-folders of `<model folder>/adapters` (toy or a local folder)."""
    folder = _model_folder(name) / "adapters"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


class ModelHolder:
    """One MultiCrafterPipeline, loaded on first use (or by `warm_up`), with per-request adapter selection."""

    def __init__(self, name: str = "toy", adapter: str | None = None, device: str | None = None,
                 quantize: str = "none", offload: str = "none"):
        self.name, self.note = resolve_model(name)
        self.initial_adapter = adapter
        self.device = device
        self.quantize, self.offload = quantize, offload
        self._pipe = None
        self._error: str | None = None
        self._load_lock = threading.Lock()
        self.run_lock = threading.Lock()
        self._warm: threading.Thread | None = None
        self._defaults: dict[str, Any] | None = None

    # ---------------------------------------------------------------- loading
    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def warm_up(self) -> threading.Thread:
        """Start loading in the background (errors are kept and shown on the first request)."""
        if self._warm is None:
            self._warm = threading.Thread(target=self._try_load, daemon=True, name="model-warmup")
            self._warm.start()
        return self._warm

    def _try_load(self) -> None:
        try:
            self.pipe()
        except UserError as exc:
            print(f"error: {exc}", flush=True)

    def pipe(self):
        with self._load_lock:
            if self._pipe is not None:
                return self._pipe
            if self._error is not None:
                raise UserError(self._error)
            import torch

            from multicrafter import MultiCrafterPipeline

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if device.startswith("cuda") and self.name not in ("tiny", "toy") else None
            try:
                self._pipe = MultiCrafterPipeline.from_pretrained(self.name, adapter=self.initial_adapter,
                                                                  dtype=dtype, device=device, quantize=self.quantize,
                                                                  offload=self.offload)
            except Exception as exc:  # noqa: BLE001 - shown once as one line, then on every request
                self._error = f"model '{self.name}' could not be loaded: {one_line(exc)}"
                raise UserError(self._error) from None
            return self._pipe

    # ---------------------------------------------------------------- UI defaults (no loading needed)
    @property
    def is_small(self) -> bool:
        return self.name in ("tiny", "toy")

    def defaults(self) -> dict[str, Any]:
        """Sizes and steps that suit the model: tiny/toy are 128 px models, FLUX wants 1024 px and 28 steps. Read
        from the model folder's files once per holder (the model never changes), a copy per call."""
        if self._defaults is None:
            self._defaults = self._read_defaults()
        return dict(self._defaults)

    def _read_defaults(self) -> dict[str, Any]:
        if self.name == "tiny":
            return dict(size=128, steps=8, guidance=3.5, max_sequence_length=64, true_cfg=1.0, negative_prompt="",
                        reference_sizes=self._reference_sizes())
        if self.name == "toy":
            d = dict(size=128, steps=20, guidance=1.0, max_sequence_length=64)
        else:
            d = dict(size=1024, steps=28, guidance=3.5, max_sequence_length=None)
        # the model folder's own defaults (multicrafter_sampling.json) win: the toy base knows guidance 1.0 only
        own = self._folder_sampling_defaults()
        d.update({k: own[key] for k, key in (("guidance", "guidance_scale"), ("steps", "num_inference_steps"),
                                             ("size", "height"), ("max_sequence_length", "max_sequence_length"))
                  if key in own})
        # true CFG (the toy: 3, against the empty prompt): the Generate tab's starting values
        d["true_cfg"] = float(own.get("true_cfg_scale") or 1.0)
        d["negative_prompt"] = str(own.get("negative_prompt") or "")
        d["reference_sizes"] = self._reference_sizes()
        return d

    def _reference_sizes(self) -> tuple[int, int]:
        """(long side for one reference, for several) the model uses before any adapter: the model folder's
        multicrafter_references.json, tiny's own, else UNO's 512 / 320 (a hub id's file is read when it loads)."""
        from multicrafter import presets
        from multicrafter.references import ReferenceOptions

        if self.name == "tiny":
            opts = ReferenceOptions(**presets.TINY_REFERENCE_SIZES)
        else:
            folder = _model_folder(self.name)
            try:
                opts = presets.reference_options_for(str(folder)) if folder.is_dir() else ReferenceOptions()
            except UserError:
                opts = ReferenceOptions()  # reported when the model loads
        return opts.long_side_single, opts.long_side_multi

    def _folder_sampling_defaults(self) -> dict[str, Any]:
        from multicrafter.presets import sampling_defaults_for

        if self.name == "tiny":
            return {}
        folder = _model_folder(self.name)
        try:
            return sampling_defaults_for(folder) if folder.is_dir() else {}
        except UserError:
            return {}  # reported when the model loads

    def adapter_choices(self) -> list[str]:
        """The loaded pipeline's own list (MultiCrafterPipeline.available_adapters); before loading, the same
        listing of the model folder, so the dropdown is right without waiting for the model."""
        if self.loaded:
            names = self._pipe.available_adapters()
        else:
            names = _folder_adapters(self.name)
        return [NO_ADAPTER, *names, FOLDER_ADAPTER]

    def default_adapter(self) -> str:
        """The adapter dropdown's first value: `--adapter` (MULTICRAFTER_ADAPTER) when it names one of the model's
        adapters, `folder...` when it is anything else (a folder, a LoRA file or a Hub id, shown in the folder field
        and resolved by `MultiCrafterPipeline.load_adapter`), else the model folder's default adapter."""
        if self.initial_adapter:
            return self.initial_adapter if self.initial_adapter in self.adapter_choices() else FOLDER_ADAPTER
        from multicrafter import presets

        try:
            name = presets.default_adapter_for(_model_folder(self.name)) if self.name != "tiny" else None
        except UserError:
            name = None  # reported when the model loads
        return name if name in self.adapter_choices() else NO_ADAPTER

    # ---------------------------------------------------------------- per-request adapter selection
    @contextlib.contextmanager
    def session(self, adapter: str | None, folder: str | None = None) -> Iterator[tuple[Any, bool, str | None]]:
        """Lock the model, load the chosen adapter if it is not the loaded one; yields (pipe, use_adapter, label)."""
        pipe = self.pipe()
        choice = (adapter or NO_ADAPTER).strip()
        with self.run_lock:
            if choice == NO_ADAPTER:
                yield pipe, False, None
                return
            target = choice
            if choice == FOLDER_ADAPTER:
                target = (folder or "").strip()
                if not target:
                    raise UserError("choose an adapter folder or Hub id (or pick 'none' or a named adapter)")
                # A folder, a LoRA file or a Hub id owner/name: load_adapter resolves it (one-line error if it can't)
            if pipe.adapter_name != target:
                pipe.load_adapter(target, fuse=True)   # inference only: the LoRA merged into the base weights
            yield pipe, True, target
