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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxPipeline
from diffusers.utils import BaseOutput

from . import memory, presets
from .adapter_sources import resolve_adapter
from .adapters import (
    AdapterConfig,
    fuse_lora,
    has_adapter,
    load_adapter,
    remove_adapter,
    save_adapter,
    set_adapter_enabled,
)
from .attention import (
    AttentionCapture,
    CaptureLayout,
    chosen_heads,
    find_capture,
    install_capture,
    normalize_maps,
    remove_capture,
)
from .convert_uno import uno_sigmas
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

SCHEDULES = ("flux", "uno")   # FluxPipeline's time schedule; UNO's (see convert_uno.uno_sigmas)


@dataclass
class MultiCrafterPipelineOutput(BaseOutput):
    """
    Output class of [`MultiCrafterPipeline`].

    Args:
        images (`list[PIL.Image.Image]` or `np.ndarray` or `torch.Tensor`):
            The generated images: PIL images, a `(batch, height, width, 3)` NumPy array, or packed latents with
            `output_type="latent"`.
        attention_maps (`torch.Tensor`, *optional*):
            Set with `return_attention=True`: each subject's attention map on the packed target grid (height/16 x
            width/16 with FLUX's VAE), averaged over the denoising steps and captured blocks and scaled so its peak
            is 1 (the form the Dice loss compares with a mask). Shape `(num_subjects, h, w)` for one image,
            `(batch, num_subjects, h, w)` for several.
        attention_per_step (`torch.Tensor`, *optional*):
            The first image's maps per denoising step, `(num_steps, num_subjects, h, w)`, each step peak-normalised.
        attention_per_block (`dict[int, torch.Tensor]`, *optional*):
            The first image's maps per captured block, `{block: (num_subjects, h, w)}`, averaged over steps. Keys are
            double-block indices; single block `i` is `num_double_blocks + i`.
        reference_images (`list[PIL.Image.Image]`, *optional*):
            The references as the model saw them (loaded, converted to RGB and resized by the reference options).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
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
    r"""
    Multi-subject generation on FLUX: FluxPipeline plus in-context reference subjects, per-subject attention maps
    and MultiCrafter adapters (LoRA + MoE-LoRA).

    The components and their names are FluxPipeline's (`transformer`, `vae`, `text_encoder`, `tokenizer`,
    `text_encoder_2`, `tokenizer_2`, `scheduler`). With no reference images and no adapter a call gives exactly the
    image stock `FluxPipeline` gives on the same components and arguments.

    Example:
        ```py
        >>> import torch
        >>> from multicrafter import MultiCrafterPipeline

        >>> pipe = MultiCrafterPipeline.from_pretrained("toy")
        >>> out = pipe(prompt="...", reference_images=["a.png", "b.png"], generator=torch.Generator().manual_seed(0),
        ...            return_attention=True)
        >>> out.images[0].save("out.png")
        >>> out.attention_maps.shape  # (2, height // 16, width // 16)
        ```

    Attributes:
        reference_options (`ReferenceOptions`): how references are prepared for the next calls (sizes, style,
            t = 0 modulation); set from the model folder and the loaded adapter.
        adapter_name (`str`, *optional*): the loaded adapter's name or folder, None without one.
        model_dir (`str`, *optional*): the model folder (None for `tiny`); its `adapters/` holds named adapters.
        sampling_defaults (`dict`): arguments a call falls back to when they are left out: the model folder's
            (`multicrafter_sampling.json`) updated by the loaded adapter's.
    """

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None):
        # The same arguments as FluxPipeline.__init__: diffusers reads this signature to find the components.
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.reference_options: ReferenceOptions = ReferenceOptions()
        self.base_reference_options: ReferenceOptions | None = None   # the model's own; adapters adjust from here
        self.adapter_name: str | None = None
        self.model_dir: str | None = None
        self.sampling_defaults: dict[str, Any] = {}        # e.g. UNO's 25 steps / guidance 4 from a converted adapter
        self.base_sampling_defaults: dict[str, Any] = {}   # the model folder's own; an adapter's are added on top
        self._adapter_enabled = True
        self.quantize, self.offload, self.vae_tiling = "none", "none", False   # memory modes (from_pretrained)

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
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path = "toy", adapter: str | Path | bool | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        enable_model_cpu_offload: bool = False, quantize: str = "none", offload: str = "none",
                        vae_tiling: bool = False, **kwargs: Any) -> MultiCrafterPipeline:
        r"""
        Load a model, and optionally an adapter onto it.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`, *optional*, defaults to `"toy"`):
                `"toy"`: the embedded ToyWorld model (offline, CPU). `"tiny"`: a random tiny FLUX-architecture model
                built from configs (tests). Anything else: a diffusers FLUX pipeline folder or a Hub id such as
                `"black-forest-labs/FLUX.1-dev"`.
            adapter (`str` or `os.PathLike`, *optional*):
                The name of an adapter under the model folder's `adapters/`, an adapter folder or LoRA file, or a
                Hugging Face Hub id `owner/name[@revision][/subfolder or /file.safetensors]` (tried in that order;
                a LoRA in UNO's format is converted once and cached; see `load_adapter`). Left out on `"toy"`, the
                toy's shipped default adapter is loaded; `False` loads none.
            dtype (`torch.dtype`, *optional*):
                Weights dtype (e.g. `torch.bfloat16` for FLUX.1-dev on a GPU); float32 for `"tiny"` when left out.
            device (`str` or `torch.device`, *optional*):
                Move the pipeline there after loading.
            enable_model_cpu_offload (`bool`, *optional*, defaults to `False`):
                Call `enable_model_cpu_offload()` after loading (the same as `offload="model"`).
            quantize (`str`, *optional*, defaults to `"none"`):
                Weight quantisation of the transformer and T5: `"int8"` (torchao int8 weight-only), `"fp8"` (torchao
                float8 weight-only), `"nf4"` (bitsandbytes 4-bit, CUDA only). int8 and fp8 run on CPU too. Adapters
                load on top; their LoRA is then not fused into the (quantised) base weights.
            offload (`str`, *optional*, defaults to `"none"`):
                `"model"` (`enable_model_cpu_offload`) or `"sequential"` (`enable_sequential_cpu_offload`); both need
                a CUDA GPU.
            vae_tiling (`bool`, *optional*, defaults to `False`):
                Always decode in VAE tiles; otherwise tiling switches on by itself above 1024x1024 output pixels.
            kwargs (*optional*):
                Passed on to `DiffusionPipeline.from_pretrained` (e.g. `revision`, `local_files_only`).

        Returns:
            [`MultiCrafterPipeline`]: the loaded pipeline. A model or adapter that cannot be loaded raises
            `UserError` with one line saying why.
        """
        name = str(pretrained_model_name_or_path)
        if enable_model_cpu_offload and offload == "none":
            offload = "model"
        memory.check_modes(quantize, offload)
        if name == "tiny":
            pipe = cls(**presets.build_tiny_components(dtype=dtype or torch.float32))
            memory.quantize_in_place(pipe, quantize)
            pipe.reference_options = ReferenceOptions(**presets.TINY_REFERENCE_SIZES)
            pipe.base_reference_options = pipe.reference_options
        else:
            path = presets.resolve_model_path(name)
            if dtype is not None:
                kwargs["dtype"] = dtype
            if quantize != "none":
                kwargs["quantization_config"] = memory.pipeline_quantization_config(quantize, dtype)
                # torchao's loader otherwise turns every other layer to bf16: keep the checkpoint's float32
                kwargs.setdefault("dtype", torch.float32)
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
        pipe.quantize, pipe.offload, pipe.vae_tiling = quantize, offload, vae_tiling
        if device is not None and offload == "none":
            pipe.to(device)
        memory.apply_offload(pipe, offload)
        if adapter:
            pipe.load_adapter(adapter, fuse=True)   # inference: training loads through load_adapter, unfused
        return pipe

    # ---------------------------------------------------------------- adapters
    def _adapter_dir(self, name_or_dir: str | Path) -> Path:
        """The adapter folder: a named adapter of the model, a local path, then a Hub id (UNO LoRAs converted once
        and cached); see `multicrafter.adapter_sources`."""
        return resolve_adapter(name_or_dir, self.transformer, self.model_dir)

    def available_adapters(self) -> list[str]:
        """Names of the adapters shipped in the model folder's `adapters/` (empty without a model folder)."""
        if self.model_dir is None or not (Path(self.model_dir) / "adapters").is_dir():
            return []
        return sorted(p.name for p in (Path(self.model_dir) / "adapters").iterdir() if p.is_dir())

    def load_adapter(self, name_or_dir: str | Path, fuse: bool = False) -> AdapterConfig:
        r"""
        Load a MultiCrafter adapter (LoRA + optional MoE-LoRA), replacing any loaded one.

        Every check runs before the current adapter is touched, so a refused folder leaves it in place. The reference
        options are rebuilt from the model's own plus what the adapter recorded (style, sizes, t = 0 option), and
        the sampling defaults from the model folder's plus the adapter's.

        Args:
            name_or_dir (`str` or `os.PathLike`):
                Tried in this order: the name of an adapter under the model folder's `adapters/`; a local adapter
                folder (`adapter_config.json` and/or `pytorch_lora_weights.safetensors`, optionally
                `moe_lora.safetensors`) or LoRA file; a Hugging Face Hub id `owner/name[@revision][/subfolder or
                /file.safetensors]`. A LoRA in UNO's format (recognised by its keys) is converted on first load and
                the result cached under `~/.cache/multicrafter/adapters/`. With `HF_HUB_OFFLINE=1` only the local
                Hugging Face cache is read.
            fuse (`bool`, *optional*, defaults to `False`):
                For inference: merge the plain LoRA into the base weights (no per-step LoRA cost; MoE-LoRA stays
                routed). Switching the adapter off restores the exact base weights. Skipped on quantised weights.
                Never for training (the LoRA weights would no longer act through their own path).

        Returns:
            `AdapterConfig`: the loaded adapter's config. A missing or unfit adapter raises `UserError`.
        """
        directory = self._adapter_dir(name_or_dir)
        with self._lock:
            try:
                cfg = load_adapter(self.transformer, directory)
                if fuse:
                    fuse_lora(self.transformer)
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
            if extra.get("source") == "UNO":   # UNO's weights sample on UNO's schedule (older conversions lack it)
                self.sampling_defaults.setdefault("schedule", "uno")
        return cfg

    def unload_adapter(self) -> None:
        """Back to the base model: no adapter, the model's own reference options and sampling defaults."""
        with self._lock:
            remove_adapter(self.transformer)
            self._reset_adapter_state()

    def _reset_adapter_state(self) -> None:
        self.adapter_name = None
        self._adapter_enabled = True
        self.sampling_defaults = dict(self.base_sampling_defaults)
        if self.base_reference_options is not None:
            self.reference_options = self.base_reference_options

    def save_adapter(self, directory: str | Path, config: AdapterConfig | None = None) -> None:
        r"""
        Write the transformer's adapter to a folder, atomically (a temporary sibling folder, then swapped in).

        Args:
            directory (`str` or `os.PathLike`):
                The adapter folder to write. An existing adapter folder is replaced; a non-empty folder that is not
                an adapter is refused.
            config (`AdapterConfig`, *optional*):
                The config to record; defaults to the one the adapter was added or loaded with (its `extra` must be
                JSON-serialisable).
        """
        save_adapter(self.transformer, directory, config)

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Switch the loaded adapter on or off without unloading it (no effect without an adapter)."""
        if self.adapter_name is not None:
            set_adapter_enabled(self.transformer, enabled)
            self._adapter_enabled = enabled

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[MultiCrafterPipeline]:
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
        """Load and resize references as a call would (`options` or the pipeline's `reference_options`)."""
        return prepare_reference_images(reference_images or [], options or self.reference_options)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        reference_images: Sequence[Any] | None = None,
        *,
        reference_options: ReferenceOptions | None = None,
        return_attention: bool = False,
        attention_mode: str = "ref2img",
        attention_blocks: Iterable[int] | None = None,
        attention_single_blocks: Iterable[int] | None = None,
        attention_heads: Iterable[int] | None = None,
        use_adapter: bool = True,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> MultiCrafterPipelineOutput | tuple:
        r"""
        Generate images containing the reference subjects. One call at a time per pipeline (calls from several
        threads queue on a lock).

        Arguments left as `None` fall back to the pipeline's `sampling_defaults` (the loaded adapter's, e.g. a
        converted UNO adapter's 25 steps and guidance 4, then the model folder's, e.g. the toy model's guidance 1.0
        and 128 px), then to FluxPipeline's own defaults.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide the image generation. If not defined, pass `prompt_embeds` instead.
            reference_images (`list` of `PIL.Image.Image`, `np.ndarray` or paths, *optional*):
                Up to 4 reference subjects, in order. Each is VAE-encoded, packed 2x2 and appended after the target
                tokens with its own diagonal position ids; only the target tokens are decoded. None or `[]`: plain
                text-to-image generation.
            reference_options (`ReferenceOptions`, *optional*):
                How references are prepared for this call (long side for one / several references, size multiple,
                `"multicrafter"` or `"uno"` preprocessing, `ref_timestep_zero` to modulate reference tokens with the
                t = 0 embedding). Defaults to the pipeline's `reference_options`.
            return_attention (`bool`, *optional*, defaults to `False`):
                Capture each subject's attention map and return it in `attention_maps`, `attention_per_step` and
                `attention_per_block`. Needs at least one reference image.
            attention_mode (`str`, *optional*, defaults to `"ref2img"`):
                `"ref2img"`: the paper's map, softmax over all keys of each subject's reference queries, target
                columns kept. `"img2ref"`: the attention mass each target position puts on each subject's keys.
            attention_blocks (`list[int]`, *optional*):
                Double-stream blocks to capture (negative indices count from the end); every double block if None.
                Ignored when a capture is already installed on the transformer (the trainer's), whose blocks are used.
            attention_single_blocks (`list[int]`, *optional*):
                Single-stream blocks to capture as well; none if None.
            attention_heads (`list[int]`, *optional*):
                Heads whose maps are averaged; every head if None.
            use_adapter (`bool`, *optional*, defaults to `True`):
                `False` runs this call on the base model with the loaded adapter switched off (for side-by-side
                comparisons); the adapter is switched back on afterwards.
            height (`int`, *optional*):
                The height in pixels of the generated image, a multiple of 16 (FLUX's VAE factor 8 times the 2x2
                packing). Defaults to the sampling defaults, else `default_sample_size * vae_scale_factor`.
            width (`int`, *optional*):
                The width in pixels of the generated image, a multiple of 16, defaulting like `height`.
            num_inference_steps (`int`, *optional*):
                The number of denoising steps (FluxPipeline's default: 28).
            guidance_scale (`float`, *optional*):
                The embedded guidance of guidance-distilled models such as FLUX.1-dev (FluxPipeline's default: 3.5).
                A base trained with one constant guidance (the toy model: 1.0) only understands that value.
            true_cfg_scale (`float`, *optional*):
                True classifier-free guidance, enabled when > 1 and a `negative_prompt` is given (each step then
                calls the transformer twice; the attention maps come from the conditional pass). Default 1.0.
            negative_prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts not to guide the image generation; used only with `true_cfg_scale` > 1.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt; every image sees the same references.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                One or a list of torch generators to make generation deterministic.
            latents (`torch.Tensor`, *optional*):
                Pre-generated packed noise latents to start from instead of sampling them with `generator`.
            max_sequence_length (`int`, *optional*):
                Maximum T5 sequence length of the prompt (FluxPipeline's default: 512; keep it small for tiny
                models).
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` for PIL images, `"np"` for a NumPy array, `"latent"` for the packed latents.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`MultiCrafterPipelineOutput`] instead of a plain tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called at the end of each denoising step as `callback_on_step_end(pipe, step, timestep,
                callback_kwargs)` (FluxPipeline's contract; e.g. a progress bar).
            kwargs (*optional*):
                Every other `FluxPipeline.__call__` argument, passed through unchanged: `prompt_2`,
                `negative_prompt_2`, `sigmas`, `prompt_embeds`, `pooled_prompt_embeds`, `negative_prompt_embeds`,
                `negative_pooled_prompt_embeds`, `ip_adapter_image`, `joint_attention_kwargs`,
                `callback_on_step_end_tensor_inputs`, ... And `schedule`: `"flux"` (FluxPipeline's sigmas, shifted
                by the packed token count) or `"uno"` (UNO's own time schedule, which a converted UNO adapter sets
                in its sampling defaults); ignored when `sigmas` is given.

        Returns:
            [`MultiCrafterPipelineOutput`] or `tuple`: a [`MultiCrafterPipelineOutput`] if `return_dict` is True,
            otherwise a tuple: `(images, attention_maps)` with `return_attention=True`, else `(images,)`. Bad input
            (a size that is not a multiple of 16, too many references, attention without references) raises
            `UserError` with one line saying why.
        """
        stock = dict(height=height, width=width, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt,
                     num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                     max_sequence_length=max_sequence_length, output_type=output_type,
                     callback_on_step_end=callback_on_step_end)
        # An argument left as None is not passed on, so FluxPipeline's own default applies after the sampling defaults.
        kwargs.update({key: value for key, value in stock.items() if value is not None})
        with self._lock:
            return self._generate(prompt, reference_images, return_attention=return_attention,
                                  attention_mode=attention_mode, attention_blocks=attention_blocks,
                                  attention_single_blocks=attention_single_blocks, attention_heads=attention_heads,
                                  use_adapter=use_adapter, reference_options=reference_options,
                                  return_dict=return_dict, **kwargs)

    def _schedule(self, kwargs: dict[str, Any], height: int, width: int) -> contextlib.AbstractContextManager:
        """Apply the `schedule` argument (or sampling default): `"flux"` keeps FluxPipeline's resolution-shifted
        sigmas; `"uno"` passes UNO's sigmas (`convert_uno.uno_sigmas`) and, for the call, a copy of the scheduler
        with dynamic shifting off and shift 1, so they are used as given. Sigmas passed by the caller win."""
        schedule = kwargs.pop("schedule", None) or "flux"
        if schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if schedule == "flux" or kwargs.get("sigmas") is not None:
            return contextlib.nullcontext()
        kwargs["sigmas"] = uno_sigmas(kwargs.get("num_inference_steps") or 28, height, width)
        return self._scheduler_without_shift()

    @contextlib.contextmanager
    def _scheduler_without_shift(self) -> Iterator[None]:
        original = self.scheduler
        self.scheduler = type(original).from_config(original.config, use_dynamic_shifting=False, shift=1.0)
        try:
            yield
        finally:
            self.scheduler = original

    def _generate(self, prompt: str | list[str] | None, reference_images: Sequence[Any] | None, *,
                  return_attention: bool, attention_mode: str, attention_blocks: Iterable[int] | None,
                  attention_single_blocks: Iterable[int] | None, attention_heads: Iterable[int] | None,
                  use_adapter: bool, reference_options: ReferenceOptions | None, return_dict: bool,
                  **kwargs: Any) -> MultiCrafterPipelineOutput | tuple:
        """The body of `__call__` (under its lock): FluxPipeline.__call__ with the reference hooks installed."""
        for key, value in self.sampling_defaults.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
        width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
        unit = self.vae_scale_factor * 2
        if height % unit or width % unit or height <= 0 or width <= 0:
            raise UserError(f"height and width must be positive multiples of {unit}, got {height}x{width}")
        kwargs["height"], kwargs["width"] = height, width
        schedule_ctx = self._schedule(kwargs, height, width)
        if self.vae_tiling or height * width > memory.VAE_TILING_PIXELS:
            self.vae.enable_tiling()   # it stays on: an image below the tile size still decodes in one piece
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
        adapter_ctx = self.adapter_disabled() if not use_adapter else contextlib.nullcontext()
        try:
            if packed.num_tokens or return_attention:
                handles = [self.transformer.register_forward_pre_hook(hooks.pre, with_kwargs=True),
                           self.transformer.register_forward_hook(hooks.post, with_kwargs=True)]
            with adapter_ctx, schedule_ctx:
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
