"""MultiCrafterPipeline: FluxPipeline plus in-context reference subjects, attention capture and adapters.

The denoising loop is diffusers' own FluxPipeline.__call__ (so every stock argument works and, with no references
and no adapter, the result is bit-identical to FluxPipeline). References enter through two forward hooks on the
transformer: the pre-hook appends the packed reference tokens and their UnoPE ids to the image stream (and tells the
attention capture where everything sits), the post-hook keeps only the target tokens of the prediction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxPipeline
from diffusers.utils import BaseOutput

from . import presets
from .attention import (
    AttentionCapture,
    CaptureLayout,
    chosen_heads,
    find_capture,
    install_capture,
    normalize_maps,
    remove_capture,
)
from .errors import UserError, one_line
from .ref_timestep import find_ref_timestep, install_ref_timestep
from .references import (
    PackedReferences,
    ReferenceOptions,
    encode_references,
    join_references,
    prepare_reference_images,
    target_grid,
)


@dataclass
class MultiCrafterPipelineOutput(BaseOutput):
    """images: generated images. attention_maps: (N, h, w) for one image ((B, N, h, w) for a batch), each subject's
    map averaged over steps and captured blocks and peak-normalised as in the Dice loss. attention_per_step:
    (steps, N, h, w); attention_per_block: {block: (N, h, w)} (first image of the batch), for inspection."""

    images: list[PIL.Image.Image] | np.ndarray
    attention_maps: torch.Tensor | None = None
    attention_per_step: torch.Tensor | None = None
    attention_per_block: dict[int, torch.Tensor] | None = None
    reference_images: list[PIL.Image.Image] | None = None


class _ReferenceHooks:
    """Forward hooks that condition every transformer call of one generation on the packed references."""

    def __init__(self, refs: PackedReferences, capture: AttentionCapture | None, calls_per_step: int):
        self.refs, self.capture, self.calls_per_step = refs, capture, calls_per_step
        self.calls = 0
        self.n_target = 0

    def pre(self, module, args, kwargs):
        hs, ids = kwargs["hidden_states"], kwargs["img_ids"]
        self.n_target = hs.shape[1]
        kwargs["hidden_states"], kwargs["img_ids"] = join_references(hs, ids, self.refs)
        if self.capture is not None:
            cond = self.calls % self.calls_per_step == 0   # with true CFG the negative pass follows; skip it
            self.capture.enabled = cond
            self.capture.layout = CaptureLayout(kwargs["encoder_hidden_states"].shape[1], self.n_target,
                                                list(self.refs.lengths))
        return args, kwargs

    def post(self, module, args, kwargs, output):
        if self.capture is not None and self.capture.enabled:
            self.capture.end_step()
        self.calls += 1
        if isinstance(output, tuple):
            return (output[0][:, : self.n_target],) + tuple(output[1:])
        output.sample = output.sample[:, : self.n_target]
        return output


class MultiCrafterPipeline(FluxPipeline):
    """Multi-subject generation on FLUX: `pipe(prompt=..., reference_images=[a, b], return_attention=True)`."""

    reference_options: ReferenceOptions = ReferenceOptions()
    adapter_name: str | None = None
    model_dir: str | None = None
    sampling_defaults: dict[str, Any] = {}   # e.g. UNO's 25 steps / guidance 4, from a converted UNO adapter
    base_sampling_defaults: dict[str, Any] = {}   # the model folder's own (multicrafter_sampling.json); adapters add
    base_reference_options: ReferenceOptions | None = None   # the model's own; adapters adjust from here
    _adapter_enabled: bool = True

    @property
    def _lock(self) -> threading.RLock:
        """Serialises calls that change the shared transformer (hooks, processors, adapters) across threads."""
        lock = self.__dict__.get("_mc_lock")
        if lock is None:
            lock = threading.RLock()
            object.__setattr__(self, "_mc_lock", lock)
        return lock

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path = "toy", adapter: str | Path | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        enable_model_cpu_offload: bool = False, **kwargs: Any) -> MultiCrafterPipeline:
        """`tiny` (random, from configs), `toy` (embedded, offline), or any diffusers FLUX folder / hub id."""
        name = str(pretrained_model_name_or_path)
        if name == "tiny":
            pipe = cls(**presets.build_tiny_components(dtype=dtype or torch.float32))
            pipe.reference_options = ReferenceOptions(**presets.TINY_REFERENCE_SIZES)
            pipe.base_reference_options = pipe.reference_options
        else:
            path = presets.resolve_model_path(name)
            if dtype is not None:
                kwargs["dtype"] = dtype
            try:
                pipe = super().from_pretrained(path, **kwargs)
            except (OSError, ValueError) as exc:
                if Path(path).exists():
                    raise UserError(f"cannot load model folder {path}: {one_line(exc)}") from None
                raise presets.load_error(name, exc) from None
            pipe.model_dir = path
            pipe.reference_options = pipe.base_reference_options = presets.reference_options_for(path)
            pipe.base_sampling_defaults = presets.sampling_defaults_for(path)
            pipe.sampling_defaults = dict(pipe.base_sampling_defaults)
            # adapter=None on `toy` means its shipped default; adapter=False means none at all.
            if name == "toy" and adapter is None:
                adapter = presets.default_adapter_for(path)
        if device is not None:
            pipe.to(device)
        if enable_model_cpu_offload:
            pipe.enable_model_cpu_offload()
        if adapter:
            pipe.load_adapter(adapter)
        return pipe

    # ---------------------------------------------------------------- adapters
    def _adapter_dir(self, name_or_dir: str | Path) -> Path:
        p = Path(name_or_dir).expanduser()
        if p.is_dir():
            return p
        if self.model_dir is not None and (Path(self.model_dir) / "adapters" / str(name_or_dir)).is_dir():
            return Path(self.model_dir) / "adapters" / str(name_or_dir)
        raise UserError(f"adapter '{name_or_dir}' not found (not a folder, and not a named adapter of this model)")

    def available_adapters(self) -> list[str]:
        if self.model_dir is None or not (Path(self.model_dir) / "adapters").is_dir():
            return []
        return sorted(p.name for p in (Path(self.model_dir) / "adapters").iterdir() if p.is_dir())

    def load_adapter(self, name_or_dir: str | Path):
        """Load a MultiCrafter adapter folder (LoRA + optional MoE-LoRA), replacing any loaded one.

        Every check runs before the current adapter is touched, so a refused folder leaves it in place. The reference
        options are rebuilt from the model's own plus what the adapter recorded (style, sizes, t = 0 option).
        """
        from .adapters import has_adapter, load_adapter

        directory = self._adapter_dir(name_or_dir)
        with self._lock:
            try:
                cfg = load_adapter(self.transformer, directory)
            except BaseException:
                if not has_adapter(self.transformer):
                    self._reset_adapter_state()
                raise
            self.adapter_name = str(name_or_dir)
            self._adapter_enabled = True
            extra = getattr(cfg, "extra", None) or {}
            opts = self.base_reference_options or self.reference_options
            changes: dict[str, Any] = {}
            if "reference_style" in extra:
                changes["style"] = extra["reference_style"]
            if "ref_timestep_zero" in extra:
                changes["ref_timestep_zero"] = bool(extra["ref_timestep_zero"])
            for key in ("long_side_single", "long_side_multi"):
                value = (extra.get("reference_sizes") or {}).get(key)
                if value:
                    changes[key] = int(value)
            self.reference_options = dataclasses.replace(opts, **changes)
            self.sampling_defaults = {**self.base_sampling_defaults, **extra.get("sampling_defaults", {})}
        return cfg

    def unload_adapter(self) -> None:
        """Back to the base model: no adapter, the model's own reference options and sampling defaults."""
        from .adapters import remove_adapter

        with self._lock:
            remove_adapter(self.transformer)
            self._reset_adapter_state()

    def _reset_adapter_state(self) -> None:
        self.adapter_name = None
        self._adapter_enabled = True
        self.sampling_defaults = dict(self.base_sampling_defaults)
        if self.base_reference_options is not None:
            self.reference_options = self.base_reference_options

    def save_adapter(self, directory: str | Path, config: Any = None) -> None:
        from .adapters import save_adapter

        save_adapter(self.transformer, directory, config)

    def set_adapter_enabled(self, enabled: bool) -> None:
        from .adapters import set_adapter_enabled

        if self.adapter_name is not None:
            set_adapter_enabled(self.transformer, enabled)
            self._adapter_enabled = enabled

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the base model without the adapter (for with/without comparisons), then restore its previous state."""
        previous = self._adapter_enabled
        self.set_adapter_enabled(False)
        try:
            yield self
        finally:
            self.set_adapter_enabled(previous)

    # ---------------------------------------------------------------- generation
    def prepare_references(self, reference_images: Sequence[Any] | None,
                           options: ReferenceOptions | None = None) -> list[PIL.Image.Image]:
        return prepare_reference_images(reference_images or [], options or self.reference_options)

    def __call__(self, *args: Any, **kwargs: Any):
        """Generate with reference subjects (see `generate`); one call at a time per pipeline."""
        with self._lock:
            return self.generate(*args, **kwargs)

    @torch.no_grad()
    def generate(self, prompt: str | list[str] | None = None, reference_images: Sequence[Any] | None = None, *,
                 return_attention: bool = False, attention_mode: str = "ref2img",
                 attention_blocks: Iterable[int] | None = None,
                 attention_single_blocks: Iterable[int] | None = None,
                 attention_heads: Iterable[int] | None = None, use_adapter: bool = True,
                 reference_options: ReferenceOptions | None = None, **kwargs: Any):
        """Generate with reference subjects. Accepts every FluxPipeline.__call__ argument through **kwargs.

        Arguments left out fall back to the loaded adapter's sampling defaults (a converted UNO adapter: UNO's
        25 steps, guidance 4, 512x512), then the model folder's (the toy model: guidance 1.0, 128 px), then to
        FluxPipeline's own defaults.
        """
        for key, value in self.sampling_defaults.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
        width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
        unit = self.vae_scale_factor * 2
        if height % unit or width % unit or height <= 0 or width <= 0:
            raise UserError(f"height and width must be positive multiples of {unit}, got {height}x{width}")
        kwargs["height"], kwargs["width"] = height, width
        refs_pil = self.prepare_references(reference_images, reference_options)
        if return_attention and not refs_pil:
            raise UserError("attention maps need at least one reference image")

        grid = target_grid(height, width, self.vae_scale_factor)
        device = self._execution_device
        packed = encode_references(self.vae, refs_pil, grid, 1, device, self.transformer.dtype)

        # Shared transformer state this call may change, restored afterwards: an attention capture installed by
        # someone else (the trainer's, whose blocks are then used) and the per-token t = 0 modulation.
        capture, installed = find_capture(self.transformer), False
        saved_capture = (capture.enabled, capture.layout, capture.mode) if capture is not None else None
        if return_attention and capture is None:
            heads = chosen_heads(attention_heads, self.transformer.config.num_attention_heads, "attention_heads")
            capture, installed = AttentionCapture(mode=attention_mode, heads=heads), True
            install_capture(self.transformer, capture, attention_blocks, attention_single_blocks)
        if capture is not None:
            capture.clear()
            capture.mode, capture.enabled = attention_mode, return_attention
        ref_t0 = find_ref_timestep(self.transformer)
        saved_t0 = (ref_t0.enabled, ref_t0.n_ref) if ref_t0 is not None else None
        if (reference_options or self.reference_options).ref_timestep_zero and packed.num_tokens:
            ref_t0 = ref_t0 or install_ref_timestep(self.transformer)
            ref_t0.enabled, ref_t0.n_ref = True, packed.num_tokens
        elif ref_t0 is not None:
            ref_t0.enabled = False
        # Exactly diffusers' rule for true CFG: then each step calls the transformer twice (cond, then uncond).
        has_neg = kwargs.get("negative_prompt") is not None or (
            kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is not None)
        calls_per_step = 2 if ((kwargs.get("true_cfg_scale") or 1.0) > 1 and has_neg) else 1
        hooks = _ReferenceHooks(packed, capture if return_attention else None, calls_per_step)
        handles = []
        return_dict = kwargs.pop("return_dict", True)
        adapter_ctx = self.adapter_disabled() if not use_adapter else contextlib.nullcontext()
        try:
            if packed.num_tokens or return_attention:
                handles = [self.transformer.register_forward_pre_hook(hooks.pre, with_kwargs=True),
                           self.transformer.register_forward_hook(hooks.post, with_kwargs=True)]
            with adapter_ctx:
                result = FluxPipeline.__call__(self, prompt=prompt, return_dict=True, **kwargs)
        finally:
            for h in handles:
                h.remove()
            if ref_t0 is not None:
                ref_t0.enabled, ref_t0.n_ref = saved_t0 if saved_t0 is not None else (False, 0)
            if installed:
                remove_capture(self.transformer)
            elif saved_capture is not None:
                capture.enabled, capture.layout, capture.mode = saved_capture
        out = MultiCrafterPipelineOutput(images=result.images, reference_images=refs_pil)
        if capture is not None and capture.per_step:
            out.attention_per_step, out.attention_maps, out.attention_per_block = _summarise(capture, grid)
        if not return_dict:
            return (out.images, out.attention_maps) if return_attention else (out.images,)
        return out


def _summarise(capture: AttentionCapture, grid: tuple[int, int]):
    """Per-step, overall and per-block maps on the packed target grid, each peak-normalised."""
    steps = torch.stack(capture.per_step)                  # (S, B, N, T)
    s, b, n, _ = steps.shape
    overall = normalize_maps(steps.mean(0)).reshape(b, n, *grid)
    per_step = normalize_maps(steps[:, 0]).reshape(s, n, *grid)
    per_block = {k: normalize_maps(v[0]).reshape(n, *grid) for k, v in capture.per_block().items()}
    return per_step, (overall[0] if b == 1 else overall), per_block
