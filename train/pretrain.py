"""Pre-training (the paper's fidelity phase): `python -m train.pretrain --config FILE [--max-steps N] [--output-dir DIR]
[--resume]`.

Two modes. `base`: full-weight text-to-image flow matching of a FLUX-architecture transformer (how the toy base is
made), optionally with references from the start. `adapter`: a frozen base plus a MultiCrafter adapter (peft LoRA on
the attention projections and/or MoE-LoRA on the output-side FFNs) trained with L = L_diff + λ·L_attn, where L_attn is
the Dice loss between each subject's captured attention map and its mask (DESIGN §4). With λ = 0 no capture is
installed at all, so the run is exactly plain flow matching.

Every model call goes through `multicrafter.references.predict_velocity`. Resuming restores trainable weights,
optimizer, LR schedule, EMA, every RNG and the data position, so on CPU a resumed run logs the same losses as an
uninterrupted one. `--max-steps` stops early (with a checkpoint); the LR schedule keeps `train.max_steps` as horizon.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multicrafter.errors import UserError, run_cli
from multicrafter.losses import (
    TimestepSampling,
    bleed_loss,
    dice_loss,
    flow_matching_loss,
    noisy_latents,
    sample_sigmas,
)

from .common import (
    EMA,
    MetricsLogger,
    OptimConfig,
    build_model,
    build_optimizer,
    capture_rng_state,
    checkpoint_step,
    config_to_dict,
    grad_norm,
    list_checkpoints,
    load_checkpoint,
    load_config,
    parse_dtype,
    parse_set_overrides,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    setup_accelerator,
    training_parser,
)
from .data import BatchOrder, DataConfig, TrainingSet, ensure_toyworld, load_samples

MODES = ("base", "adapter")
ATTENTION_LOSSES = {"dice": dice_loss, "bleed": bleed_loss}


# ------------------------------------------------------------------------------------------------ config


@dataclass
class ModelConfig:
    name: str = "tiny"                   # tiny | toy | a diffusers FLUX folder | a hub id
    dtype: str = "fp32"                  # frozen weights: fp32 | bf16 | fp16 (trainable weights stay fp32)
    gradient_checkpointing: bool = False
    guidance: float = 1.0                # guidance embedding fed during training (guidance-distilled models)
    # Replace the loaded transformer by a fresh random FluxTransformer2DModel with these config keys (seeded by
    # train.seed): how a new base is started from a folder that holds only a trained VAE and text side. in_channels,
    # joint_attention_dim, pooled_projection_dim and guidance_embeds default to the loaded model's.
    init_transformer: dict[str, Any] | None = None
    # Modulate reference tokens with the t = 0 embedding (MOSAIC option; multicrafter/ref_timestep.py). Recorded in
    # the adapter so inference does the same. Default: references share the target's timestep (UNO).
    ref_timestep_zero: bool = False
    vae: str | None = None               # replace the VAE by this diffusers AutoencoderKL folder (e.g. the toy VAE)
    # Rebuild the T5 encoder's relative position bias with this many buckets (fresh init, every other weight kept).
    # Why: FLUX gives text tokens no positions (txt_ids are zeros), so word order reaches the transformer only through
    # T5's context. The toy's random T5 had 8 buckets (exact offsets 0 and 1 only), too few to tie a colour word to its
    # subject; with 32 (exact up to 7) a trained T5 can. Only meaningful with train.train_text_encoders.
    t5_relative_buckets: int | None = None
    # With t5_relative_buckets: start the rebuilt bias as local windows instead of noise (head 0 reads the 3 words
    # before, head 1 the 3 after, heads 2-3 the next ring out, ...). Why: trained from a random bias, the toy T5 did not
    # learn to mix context in 500 steps (the bias moved by ~0.03); local windows tie each word to its phrase at once.
    t5_local_heads: bool = False

    def __post_init__(self) -> None:
        if self.t5_local_heads and self.t5_relative_buckets is None:
            raise UserError("model.t5_local_heads needs model.t5_relative_buckets (the windows start a rebuilt bias)")


@dataclass
class MoESection:
    num_experts: int = 4
    top_k: int = 1
    rank: int = 16
    alpha: float = 16.0
    blocks: str = "single"               # single | double | both: whose FFN linears get experts
    num_blocks: int = 8                  # the last N blocks of that kind (output side)
    target_regex: str | None = None      # overrides blocks/num_blocks
    load_balance_weight: float = 0.0     # Switch auxiliary loss weight (added to the loss)
    router_noise: float = 0.0            # training-mode router noise
    impl: str = "auto"                   # dense | grouped | auto


@dataclass
class AdapterSection:
    type: str = "lora"                   # lora | moe_lora (LoRA on attention + MoE-LoRA on FFNs)
    lora_rank: int = 16                  # 0 with moe_lora: experts only
    lora_alpha: float = 16.0
    lora_targets: str | list[str] | None = None   # regex or names; None: multicrafter.adapters.DEFAULT_LORA_TARGETS
    moe: MoESection = field(default_factory=MoESection)
    init_adapter: str | None = None      # start from this adapter folder (e.g. a converted UNO LoRA)

    def __post_init__(self) -> None:
        if self.type not in ("lora", "moe_lora"):
            raise UserError(f"adapter.type must be lora or moe_lora, got {self.type!r}")


@dataclass
class AttentionLossConfig:
    weight: float = 0.0                  # λ; 0 = plain flow matching, no capture installed
    blocks: list[int] | None = None      # double-stream blocks whose maps are averaged; None: all
    # single-stream blocks whose maps are averaged in too (our extension: in the toy the baseline localises there);
    # None: none, as in the paper
    single_blocks: list[int] | None = None
    mode: str = "ref2img"                # ref2img (paper) | img2ref
    recompute: bool = False              # recompute the map slice in backward instead of storing it
    eps: float = 1.0                     # smoothing of the loss ratio (Dice; bleed too: not exactly scale-free then)
    normalize: bool = True               # peak-normalise maps before the Dice loss (as the pipeline reports them)
    # only samples noised to sigma <= max_sigma take the Dice loss (mean over those samples); None: every sample.
    # Near pure noise the target's masks are not yet decided by anything the model sees (our extension).
    max_sigma: float | None = None
    # True: the Dice loss trains only each captured block's query/key projections (maps from detached block inputs),
    # not the hidden states upstream that also carry identity (our extension)
    routing_only: bool = False
    loss: str = "dice"                   # dice (paper) | bleed (our extension: only the share on the other subjects)
    # attention heads whose maps take the loss (the same in every chosen block); None: all heads, as in the paper.
    # The heads left out stay free to read the references from anywhere (our extension)
    heads: list[int] | None = None


@dataclass
class TrainSection:
    mode: str = "adapter"                # base | adapter
    max_steps: int = 1000                # optimizer steps (and the LR schedule's horizon)
    seed: int = 0
    mixed_precision: str = "no"          # no | bf16 | fp16 (fp16: GPU only)
    gradient_accumulation_steps: int = 1
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    ema_decay: float = 0.0               # > 0: keep an EMA of the trainable weights (used for validation and saving)
    cpu: bool = False                    # force CPU even with a GPU
    # Base mode: train both text encoders with the transformer (lr: optim.text_encoder_lr). For a base whose text side
    # is random (the toy): frozen, a random T5 is a bag of words (a word's vector barely depends on its neighbours),
    # so "a red circle and a blue square" cannot say which colour is whose.
    train_text_encoders: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"train.mode must be base or adapter, got {self.mode!r}")
        if self.max_steps < 1:
            raise UserError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.train_text_encoders and self.mode != "base":
            raise UserError("train.train_text_encoders needs train.mode: base (adapters train the transformer only)")


@dataclass
class OutputSection:
    output_dir: str = "runs/pretrain"
    log_every: int = 1
    checkpoint_every: int = 100          # 0: only at the end
    keep_last: int = 2
    validate_every: int = 0              # 0: only at the end; images + attention maps under OUTPUT/samples/
    validation_steps: int = 4            # denoising steps of the validation images
    validation_guidance: float | None = None   # None: the model's own (sampling_defaults), else 3.5
    progress: bool = True                # tqdm bar


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="data"))
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    attention_loss: AttentionLossConfig = field(default_factory=AttentionLossConfig)
    output: OutputSection = field(default_factory=OutputSection)


def adapter_config(cfg: PretrainConfig, ref_options) -> object:
    """The AdapterConfig the YAML describes (extra records the reference sizes it was trained with)."""
    from multicrafter.adapters import DEFAULT_LORA_TARGETS, AdapterConfig, MoELoRAConfig

    a = cfg.adapter
    moe = None
    if a.type == "moe_lora":
        m = a.moe
        moe = MoELoRAConfig(num_experts=m.num_experts, top_k=m.top_k, rank=m.rank, alpha=m.alpha, blocks=m.blocks,
                            num_blocks=m.num_blocks, target_regex=m.target_regex,
                            load_balance_weight=m.load_balance_weight, router_noise=m.router_noise, impl=m.impl)
    extra = {"reference_sizes": {"long_side_single": ref_options.long_side_single,
                                 "long_side_multi": ref_options.long_side_multi},
             "attention_loss_weight": cfg.attention_loss.weight, "ref_timestep_zero": cfg.model.ref_timestep_zero}
    return AdapterConfig(lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
                         lora_targets=a.lora_targets if a.lora_targets is not None else DEFAULT_LORA_TARGETS,
                         moe=moe, extra=extra)


def local_position_bias(num_buckets: int, num_heads: int, max_distance: int, strength: float = 6.0) -> torch.Tensor:
    """(num_buckets, num_heads) T5 relative-position bias where head h attends to one window of neighbours: even
    heads before the word, odd heads after it, rings of offsets 1-3, 4-8, 9-16, ... (`strength` inside, 0 outside)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    rings = [(1, 3), (4, 8), (9, 16), (17, 32), (33, 64)]
    bias = torch.zeros(num_buckets, num_heads)
    for h in range(num_heads):
        lo, hi = rings[min(h // 2, len(rings) - 1)]
        sign = -1 if h % 2 == 0 else 1
        offsets = torch.arange(lo, hi + 1) * sign
        buckets = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=num_buckets,
                                                        max_distance=max_distance)
        bias[buckets.unique(), h] = strength
    return bias


def rebuild_t5_position_bias(old, buckets: int, local_heads: bool = False, seed: int = 0):
    """`old` (a T5EncoderModel) with `buckets` relative-position buckets: every weight kept but the position bias,
    which starts fresh (random, or `local_position_bias` windows). A model that already has `buckets` is returned
    as is, so a continued stage keeps its trained bias."""
    from transformers import T5EncoderModel

    if old is None or not isinstance(old, T5EncoderModel):
        raise UserError("model.t5_relative_buckets: this model has no T5 text encoder")
    if buckets < 2 or buckets % 2:
        raise UserError(f"model.t5_relative_buckets must be an even number >= 2, got {buckets}")
    if old.config.relative_attention_num_buckets == buckets:
        return old
    config = old.config.__class__.from_dict({**old.config.to_dict(), "relative_attention_num_buckets": buckets})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = T5EncoderModel(config)
    kept = {k: v for k, v in old.state_dict().items() if "relative_attention_bias" not in k}
    missing, unexpected = fresh.load_state_dict(kept, strict=False)
    assert not unexpected and all("relative_attention_bias" in k for k in missing), (missing, unexpected)
    if local_heads:
        bias = fresh.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        with torch.no_grad():
            bias.copy_(local_position_bias(buckets, config.num_heads, config.relative_attention_max_distance))
    return fresh.to(old.dtype)


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Builds model, adapter, data and optimizer from a config; `train_step()` does one optimizer step."""

    def __init__(self, cfg: PretrainConfig, output_dir: str | Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output.output_dir)
        self.lam = cfg.attention_loss.weight
        if self.lam < 0:
            raise UserError(f"attention_loss.weight must be >= 0, got {self.lam}")
        if cfg.attention_loss.loss not in ATTENTION_LOSSES:
            raise UserError(f"attention_loss.loss must be one of {sorted(ATTENTION_LOSSES)}, "
                            f"got {cfg.attention_loss.loss!r}")
        max_sigma = cfg.attention_loss.max_sigma
        if max_sigma is not None and not 0 < max_sigma <= 1:
            raise UserError(f"attention_loss.max_sigma must be in (0, 1] (or null for every sample), got {max_sigma}")
        self.accelerator = acc = setup_accelerator(cfg.train)
        self.device = acc.device
        seed_everything(cfg.train.seed)
        ckpt = resolve_resume(self.output_dir, resume, acc.is_main_process)
        with acc.main_process_first():  # the dataset is validated before any model is loaded
            root = ensure_toyworld(cfg.data.toyworld, self.output_dir) if cfg.data.toyworld else cfg.data.dataset
            samples = load_samples(root)
        if self.lam > 0 and not (cfg.data.with_references and any(s.subjects for s in samples)):
            raise UserError("attention_loss.weight > 0 needs samples with subjects and masks "
                            "(and data.with_references: true)")

        # model
        self.pipe = build_model(cfg.model.name, parse_dtype(cfg.model.dtype), device=self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if cfg.model.vae is not None:
            self._replace_vae(cfg.model.vae)
        if cfg.model.init_transformer is not None:
            self._init_transformer(cfg.model.init_transformer)
        if cfg.model.t5_relative_buckets is not None:
            self._rebuild_t5_buckets(cfg.model.t5_relative_buckets)
        self.transformer = tr = self.pipe.transformer
        if cfg.model.ref_timestep_zero:
            from multicrafter.ref_timestep import install_ref_timestep

            install_ref_timestep(tr).enabled = True
        self.adapter_cfg = None
        if cfg.train.mode == "adapter":
            self._add_adapter()
        else:
            tr.requires_grad_(True)
        # every trainable weight by checkpoint name: the transformer's own names, the text encoders' prefixed
        self.named_params = {n: p for n, p in tr.named_parameters() if p.requires_grad}
        self.text_params: list[torch.nn.Parameter] = []
        if cfg.train.train_text_encoders:
            for name in ("text_encoder", "text_encoder_2"):
                module = getattr(self.pipe, name, None)
                if module is None:
                    continue
                module.requires_grad_(True)  # stays in eval mode: no dropout, as at inference
                for n, p in module.named_parameters():
                    self.named_params[f"{name}.{n}"] = p
                    self.text_params.append(p)
        self.params = list(self.named_params.values())
        for p in self.params:  # trainable weights in fp32 (frozen ones may be bf16/fp16)
            p.data = p.data.float()
        self.dtype = tr.dtype  # dtype of the model inputs: the frozen weights' (all fp32 in base mode)
        if cfg.model.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()

        # attention capture (only when λ > 0: λ = 0 is exactly plain flow matching)
        self.capture = None
        if self.lam > 0:
            from multicrafter.attention import AttentionCapture, chosen_heads, install_capture

            heads = chosen_heads(cfg.attention_loss.heads, tr.config.num_attention_heads, "attention_loss.heads")
            self.capture = AttentionCapture(mode=cfg.attention_loss.mode, recompute=cfg.attention_loss.recompute,
                                            routing_only=cfg.attention_loss.routing_only,
                                            heads=heads)
            self.capture_keys = install_capture(tr, self.capture, cfg.attention_loss.blocks,
                                                cfg.attention_loss.single_blocks)
            if not self.capture_keys:
                raise UserError("attention_loss.weight > 0 but attention_loss.blocks and single_blocks choose no block")

        # data (after the model: the reference sizes are the model's unless the config sets them)
        self.data = TrainingSet(samples, cfg.data, self.pipe.reference_options, self.pipe.vae_scale_factor,
                                text_trainable=cfg.train.train_text_encoders)
        self.pipe.reference_options = self.data.ref_options
        if cfg.model.ref_timestep_zero:  # validation samples get the conditioning the adapter is trained with
            self.pipe.reference_options = dataclasses.replace(self.data.ref_options, ref_timestep_zero=True)
        self.order = BatchOrder([it.key for it in self.data.items], cfg.data.batch_size, cfg.train.seed,
                                acc.num_processes, acc.process_index)
        self.noise_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + acc.process_index)
        self.data.precompute(self.pipe, self.device, self.dtype, progress=acc.is_main_process and cfg.output.progress)

        # optimisation
        groups: list = self.params
        if self.text_params:
            text_ids = {id(p) for p in self.text_params}
            groups = [{"params": [p for p in self.params if id(p) not in text_ids], "lr": cfg.optim.lr},
                      {"params": self.text_params, "lr": cfg.optim.text_encoder_lr or cfg.optim.lr}]
        self.optimizer, self.scheduler = build_optimizer(groups, cfg.optim, cfg.train.max_steps)
        self.model, self.optimizer = acc.prepare(tr, self.optimizer)
        self.ema = EMA(self.params, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.step = 0
        if ckpt is not None:
            self._load(ckpt)
        self.metrics = MetricsLogger(self.output_dir, resume_step=self.step if ckpt is not None else None,
                                     enabled=acc.is_main_process)

    # -------------------------------------------------------------------------------------------- setup helpers
    def _init_transformer(self, spec: dict[str, Any]) -> None:
        from diffusers import FluxTransformer2DModel

        old = self.pipe.transformer.config
        kwargs = {k: old[k] for k in ("in_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")}
        kwargs.update(spec)
        if "axes_dims_rope" in kwargs:
            kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.train.seed)
                fresh = FluxTransformer2DModel(**kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            raise UserError(f"model.init_transformer: cannot build FluxTransformer2DModel({kwargs}): {exc}") from None
        dtype = self.pipe.transformer.dtype
        fresh = (fresh if dtype == torch.float32 else fresh.to(dtype)).to(self.device)
        self.pipe.register_modules(transformer=fresh.eval().requires_grad_(False))

    def _rebuild_t5_buckets(self, buckets: int) -> None:
        new = rebuild_t5_position_bias(self.pipe.text_encoder_2, buckets, self.cfg.model.t5_local_heads,
                                       seed=self.cfg.train.seed + 3)
        if new is not self.pipe.text_encoder_2:
            self.pipe.register_modules(text_encoder_2=new.to(self.device).eval().requires_grad_(False))

    def text_embeddings(self, captions: list[str], dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and pooled embeddings with gradients into the text encoders (train.train_text_encoders);
        a dropped caption is the empty one, as in the cached path."""
        prompts = ["" if d else c for c, d in zip(captions, dropped.tolist())]
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.cfg.data.max_sequence_length)
        return embeds.to(self.dtype), pooled.to(self.dtype)

    def _replace_vae(self, folder: str) -> None:
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"model.vae: {folder} is not a diffusers AutoencoderKL folder (no config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise UserError(f"model.vae: cannot load {folder}: {exc}") from None
        vae = vae.to(self.device, self.pipe.vae.dtype).eval().requires_grad_(False)
        self.pipe.register_modules(vae=vae)
        self.pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.pipe.image_processor = VaeImageProcessor(vae_scale_factor=self.pipe.vae_scale_factor * 2)

    def _add_adapter(self) -> None:
        from multicrafter.adapters import add_adapter, load_adapter
        from multicrafter.moe_lora import inject_moe_lora

        cfg, tr = self.cfg, self.transformer
        wanted = adapter_config(cfg, self.pipe.reference_options)
        if cfg.adapter.init_adapter:
            loaded = load_adapter(tr, cfg.adapter.init_adapter)
            if wanted.moe is not None and loaded.moe is None:  # e.g. a UNO LoRA, then fresh MoE experts on top
                inject_moe_lora(tr, wanted.moe)
                loaded.moe = wanted.moe
            elif (loaded.lora_rank, loaded.moe) != (wanted.lora_rank, wanted.moe):
                print(f"init_adapter {cfg.adapter.init_adapter}: its own structure (LoRA rank {loaded.lora_rank}, "
                      f"MoE {'yes' if loaded.moe else 'no'}) replaces the adapter section")
            loaded.extra = {**loaded.extra, **wanted.extra, "init_adapter": str(cfg.adapter.init_adapter)}
            self.adapter_cfg = loaded
        else:
            add_adapter(tr, wanted)
            self.adapter_cfg = wanted
        from multicrafter.adapters import adapter_parameters

        for p in adapter_parameters(tr):
            p.requires_grad_(True)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.transformer

    # -------------------------------------------------------------------------------------------- the step
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """L = L_diff + λ·L_attn (+ MoE load-balance term) for one micro-batch."""
        from multicrafter.moe_lora import moe_aux_loss, moe_modules
        from multicrafter.references import predict_velocity

        x0 = batch["latents"]
        b = x0.shape[0]
        mu = None
        if self.cfg.train.timesteps.scheme == "flux_shift":
            from multicrafter.sde import flux_mu

            mu = flux_mu(self.pipe.scheduler.config, x0.shape[1])
        sigmas = sample_sigmas(b, self.cfg.train.timesteps, self.noise_gen, mu=mu, device=self.device)
        noise = torch.randn(x0.shape, generator=self.noise_gen, dtype=torch.float32).to(self.device, x0.dtype)
        x_t, target = noisy_latents(x0, noise, sigmas)
        gh, gw = batch["grid"]
        from diffusers import FluxPipeline

        latent_ids = FluxPipeline._prepare_latent_image_ids(b, gh, gw, self.device, x0.dtype)
        if batch["prompt_embeds"] is None:  # trained text encoders: encode here, inside autocast and the graph
            with self.accelerator.autocast():
                batch["prompt_embeds"], batch["pooled"] = self.text_embeddings(batch["captions"],
                                                                               batch["caption_dropped"])
        text_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=self.device, dtype=x0.dtype)
        guidance = None
        if getattr(self.unwrapped.config, "guidance_embeds", False):
            guidance = torch.full((b,), self.cfg.model.guidance, device=self.device, dtype=torch.float32)
        use_capture = self.capture is not None and batch["refs"] is not None
        if self.capture is not None:
            self.capture.maps.clear()
            self.capture.enabled = use_capture
        with self.accelerator.autocast():
            pred = predict_velocity(self.model, x_t, latent_ids, sigmas, batch["prompt_embeds"], batch["pooled"],
                                    text_ids, refs=batch["refs"], guidance=guidance,
                                    capture=self.capture if use_capture else None)
        loss_diff = flow_matching_loss(pred, target)
        loss = loss_diff
        loss_attn = torch.zeros((), device=self.device)
        if use_capture:
            from multicrafter.attention import normalize_maps

            maps = self.capture.aggregate(self.capture_keys)
            if self.cfg.attention_loss.normalize:
                maps = normalize_maps(maps)
            masks = batch["masks"].to(maps.device)
            max_sigma, attn_loss = self.cfg.attention_loss.max_sigma, ATTENTION_LOSSES[self.cfg.attention_loss.loss]
            if max_sigma is None:
                loss_attn = attn_loss(maps, masks, eps=self.cfg.attention_loss.eps)
            else:  # the samples above max_sigma leave the graph through a zero term (DDP sees every parameter)
                keep = sigmas.to(maps.device) <= max_sigma
                loss_attn = maps.sum() * 0.0
                if keep.any():
                    loss_attn = loss_attn + attn_loss(maps[keep], masks[keep], eps=self.cfg.attention_loss.eps)
            loss = loss + self.lam * loss_attn
        out = {"loss_diff": loss_diff, "loss_attn": loss_attn}
        if moe_modules(self.unwrapped):
            aux = moe_aux_loss(self.unwrapped).to(self.device)
            weight = self.adapter_cfg.moe.load_balance_weight if self.adapter_cfg and self.adapter_cfg.moe else 0.0
            if weight > 0:
                loss = loss + weight * aux
            out["moe_aux"] = aux
        out["loss"] = loss
        return out

    def train_step(self) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the step's record."""
        acc, t0 = self.accelerator, time.perf_counter()
        sums: dict[str, float] = {}
        n_micro = self.cfg.train.gradient_accumulation_steps
        lr = self.optimizer.param_groups[0]["lr"]
        gnorm = 0.0
        for _ in range(n_micro):
            batch = self.data.collate(self.order.next(), self.pipe, self.device, self.dtype, self.noise_gen)
            with acc.accumulate(self.model):
                losses = self.compute_losses(batch)
                acc.backward(losses["loss"])
                if acc.sync_gradients:
                    if self.text_params and acc.num_processes > 1:  # only the transformer is DDP-wrapped
                        for p in self.text_params:
                            if p.grad is not None:
                                p.grad = acc.reduce(p.grad, "mean")
                    if self.cfg.optim.max_grad_norm > 0:
                        gnorm = float(acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm))
                    else:
                        gnorm = grad_norm(self.params)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(acc.reduce(v.detach().float(), "mean")) / n_micro
        self.step += 1
        if self.ema is not None:
            self.ema.update()
        rec = {"step": self.step, "loss": sums["loss"], "loss_diff": sums["loss_diff"], "loss_attn": sums["loss_attn"],
               "lr": lr, "grad_norm": gnorm}
        if "moe_aux" in sums:
            rec["moe_aux"] = sums["moe_aux"]
        rec["sec_per_step"] = time.perf_counter() - t0
        return rec

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "trainable": {n: p.detach().cpu().clone() for n, p in self.named_params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "data": self.order.state_dict(),
                "rng": self._gather_rng(), "config": config_to_dict(self.cfg)}

    def _gather_rng(self) -> list[dict]:
        """Every process's RNG state (index = process rank), so each rank resumes its own noise stream."""
        mine = capture_rng_state({"noise": self.noise_gen})
        if self.accelerator.num_processes == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        named = self.named_params
        mine = set(named)
        if set(state["trainable"]) != mine:
            raise UserError(f"checkpoint {path} does not match this config's trainable weights "
                            f"({len(state['trainable'])} saved, {len(mine)} here): same mode and adapter settings?")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t.to(named[n].device, named[n].dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.order.load_state_dict(state["data"])
        rngs = state["rng"]
        if len(rngs) != self.accelerator.num_processes:
            raise UserError(f"checkpoint {path} was written by {len(rngs)} process(es); resume it with the same "
                            f"number (now {self.accelerator.num_processes})")
        restore_rng_state(rngs[self.accelerator.process_index], {"noise": self.noise_gen})
        self.step = checkpoint_step(path)

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        if self.accelerator.is_main_process:
            save_checkpoint(self.output_dir, self.step, state, self.cfg.output.keep_last)
        self.accelerator.wait_for_everyone()

    # -------------------------------------------------------------------------------------------- outputs
    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is not None:
            self.ema.swap_in()
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.swap_out()

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """Images (+ attention figures when there are references) for the first samples, under samples/step-N/."""
        from multicrafter.io import save_image_atomic
        from multicrafter.attention_overlay import save_attention_figure

        if not self.accelerator.is_main_process:
            return []
        from multicrafter.ref_timestep import find_ref_timestep

        rng = capture_rng_state({"noise": self.noise_gen})
        ref_t0 = find_ref_timestep(self.unwrapped)
        ref_t0_enabled = ref_t0.enabled if ref_t0 is not None else None  # kept whatever the pipeline does with it
        folder = self.output_dir / "samples" / f"step-{self.step:06d}"
        guidance = self.cfg.output.validation_guidance
        if guidance is None:
            guidance = self.sampling_defaults().get("guidance_scale", 3.5)
        written = []
        was_training = self.unwrapped.training
        self.unwrapped.eval()
        try:
            with self._ema_weights():
                for i in range(min(self.cfg.data.num_validation, len(self.data))):
                    it = self.data.items[i]
                    kw = dict(prompt=it.caption, height=it.size[1], width=it.size[0],
                              num_inference_steps=self.cfg.output.validation_steps,
                              guidance_scale=guidance,
                              max_sequence_length=self.cfg.data.max_sequence_length,
                              generator=torch.Generator().manual_seed(self.cfg.train.seed + i))
                    with self.accelerator.autocast():  # prepare() makes the transformer return fp32 under AMP
                        out = self.pipe(reference_images=list(it.refs), return_attention=bool(it.refs), **kw)
                    save_image_atomic(out.images[0], folder / f"{it.name}.png")
                    written.append(folder / f"{it.name}.png")
                    if out.attention_maps is not None:
                        save_attention_figure(out.images[0], out.attention_maps, folder / f"{it.name}_attention.png",
                                              it.subject_names)
                        written.append(folder / f"{it.name}_attention.png")
        finally:
            self.unwrapped.train(was_training)
            if self.capture is not None:
                self.capture.clear()
                self.capture.enabled = True
            restore_rng_state(rng, {"noise": self.noise_gen})
            if ref_t0 is not None:
                ref_t0.enabled = ref_t0_enabled
        return written

    def sampling_defaults(self) -> dict[str, Any]:
        """What the saved base should be sampled with: the loaded model's own defaults, and for a transformer trained
        here from scratch the one guidance value it has seen (it is not guidance-distilled) and the training size."""
        out = dict(getattr(self.pipe, "base_sampling_defaults", {}))
        if self.cfg.model.init_transformer:
            out.update(guidance_scale=self.cfg.model.guidance, height=self.cfg.data.resolution,
                       width=self.cfg.data.resolution, max_sequence_length=self.cfg.data.max_sequence_length)
        return out

    def save_final(self) -> Path:
        """Adapter mode: OUTPUT/adapter (adapter-directory format). Base mode: OUTPUT/pipeline (save_pretrained)."""
        from multicrafter.presets import REFERENCE_CONFIG, SAMPLING_CONFIG

        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return self.output_dir
        with self._ema_weights():
            if self.cfg.train.mode == "adapter":
                from multicrafter.adapters import save_adapter

                return save_adapter(self.unwrapped, self.output_dir / "adapter", self.adapter_cfg)
            from multicrafter.io import replace_dir

            target = self.output_dir / "pipeline"
            capture = self.capture
            if capture is not None:  # save the stock processors, not the capture ones
                from multicrafter.attention import remove_capture

                remove_capture(self.unwrapped)
            # written next to the target and swapped in, so `pipeline/` is never a half-written model
            tmp = Path(tempfile.mkdtemp(prefix=".pipeline.tmp-", dir=self.output_dir))
            try:
                self.pipe.save_pretrained(tmp)
                ro = self.data.ref_options
                (tmp / REFERENCE_CONFIG).write_text(json.dumps(
                    {"long_side_single": ro.long_side_single, "long_side_multi": ro.long_side_multi}) + "\n")
                sampling = self.sampling_defaults()
                if sampling:
                    (tmp / SAMPLING_CONFIG).write_text(json.dumps(sampling) + "\n")
                replace_dir(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                if capture is not None:
                    from multicrafter.attention import install_capture

                    install_capture(self.unwrapped, capture, self.cfg.attention_loss.blocks,
                                    self.cfg.attention_loss.single_blocks)
            return target

    # -------------------------------------------------------------------------------------------- loop
    def run(self, stop_at: int | None = None) -> dict | None:
        """Train to `stop_at` (default train.max_steps); checkpoints, logs, validates; returns the last record."""
        from tqdm.auto import tqdm

        out = self.cfg.output
        end = stop_at or self.cfg.train.max_steps
        last = None
        bar = tqdm(total=end, initial=self.step, desc="pretrain", dynamic_ncols=True,
                   disable=not (out.progress and self.accelerator.is_main_process))
        try:
            while self.step < end:
                rec = self.train_step()
                last = rec
                # not `or self.step == end`: a run stopped by --max-steps and resumed must log what an uninterrupted
                # one logs
                if self.step % max(1, out.log_every) == 0 or self.step == self.cfg.train.max_steps:
                    self.metrics.log(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", attn=f"{rec['loss_attn']:.3f}")
                if out.checkpoint_every and self.step % out.checkpoint_every == 0 and self.step < end:
                    self.save_checkpoint()
                if out.validate_every and self.step % out.validate_every == 0 and self.step < end:
                    self.validate()
        finally:
            bar.close()
        if last is not None or not list_checkpoints(self.output_dir):
            self.save_checkpoint()
        self.validate()
        self.save_final()
        self.metrics.close()
        return last


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    return training_parser("python -m train.pretrain", __doc__.split("\n\n")[0], "YAML config (see train/configs/*.yaml)", "overrides output.output_dir")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = load_config(args.config, PretrainConfig, parse_set_overrides(args.set))
    trainer = Trainer(cfg, output_dir=args.output_dir, resume=args.resume)
    last = trainer.run(stop_at=args.max_steps)
    if trainer.accelerator.is_main_process:
        what = "adapter" if cfg.train.mode == "adapter" else "pipeline"
        loss = f", last loss {last['loss']:.4f}" if last else ""
        print(f"done: step {trainer.step}{loss}; {what} saved under {trainer.output_dir / what}")
    return 0


if __name__ == "__main__":
    run_cli(main)
