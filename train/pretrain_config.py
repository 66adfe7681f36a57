"""The pre-training config (`python -m train.pretrain --config FILE`): one dataclass per YAML section.

Each section checks its own values in `__post_init__` (one-line UserError naming the key); `PretrainConfig` checks the
combinations across sections. The MoE-LoRA section is the library's `MoELoRAConfig`, so the YAML keys are exactly
what an adapter folder records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from multicrafter.errors import UserError
from multicrafter.losses import TimestepSampling, bleed_loss, dice_loss
from multicrafter.memory import QUANTIZE_MODES
from multicrafter.moe_lora import MoELoRAConfig

from .data import DataConfig
from .optim import OptimConfig

MODES = ("base", "adapter")
ATTENTION_LOSSES = {"dice": dice_loss, "bleed": bleed_loss}


# ------------------------------------------------------------------------------------------------ config


@dataclass
class ModelConfig:
    name: str = "tiny"                   # tiny | toy | a diffusers FLUX folder | a hub id
    dtype: str = "fp32"                  # frozen weights: fp32 | bf16 | fp16 (trainable weights stay fp32)
    # Store the frozen transformer and T5 quantised (QLoRA-style): none | int8 | fp8 (torchao, CPU too) | nf4
    # (bitsandbytes, CUDA). The adapter still trains in fp32. Adapter mode only. With gradient checkpointing this is
    # how FLUX.1-dev trains on one 24 GB card (train/configs/flux_dev_adapter_24gb.yaml).
    quantize: str = "none"
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
        if self.quantize not in QUANTIZE_MODES:
            raise UserError(f"model.quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.quantize != "none" and self.builds_base:
            raise UserError("model.quantize keeps the base frozen: it cannot be combined with init_transformer, vae "
                            "or t5_relative_buckets, which rebuild the base")
        if self.t5_relative_buckets is not None and (self.t5_relative_buckets < 2 or self.t5_relative_buckets % 2):
            raise UserError(f"model.t5_relative_buckets must be an even number >= 2, got {self.t5_relative_buckets}")
        if self.t5_local_heads and self.t5_relative_buckets is None:
            raise UserError("model.t5_local_heads needs model.t5_relative_buckets (the windows start a rebuilt bias)")

    @property
    def builds_base(self) -> bool:
        """Whether the model is (partly) rebuilt before training: a fresh transformer, another VAE, a new T5 bias."""
        return self.init_transformer is not None or self.vae is not None or self.t5_relative_buckets is not None


@dataclass
class AdapterSection:
    type: str = "lora"                   # lora | moe_lora (LoRA on attention + MoE-LoRA on FFNs)
    lora_rank: int = 16                  # 0 with moe_lora: experts only
    lora_alpha: float = 16.0
    lora_targets: str | list[str] | None = None   # regex or names; None: multicrafter.adapters.DEFAULT_LORA_TARGETS
    moe: MoELoRAConfig = field(default_factory=MoELoRAConfig)   # used with type moe_lora
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

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise UserError(f"attention_loss.weight must be >= 0, got {self.weight}")
        if self.loss not in ATTENTION_LOSSES:
            raise UserError(f"attention_loss.loss must be one of {sorted(ATTENTION_LOSSES)}, got {self.loss!r}")
        if self.max_sigma is not None and not 0 < self.max_sigma <= 1:
            raise UserError(f"attention_loss.max_sigma must be in (0, 1] (or null for every sample), "
                            f"got {self.max_sigma}")


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

    def __post_init__(self) -> None:
        if self.model.quantize != "none" and self.train.mode != "adapter":
            raise UserError("model.quantize needs train.mode: adapter (a quantised base is frozen; base mode trains "
                            "every weight)")
        if self.attention_loss.weight > 0 and not self.data.with_references:
            raise UserError("attention_loss.weight > 0 needs samples with subjects and masks "
                            "(and data.with_references: true)")


__all__ = ["ATTENTION_LOSSES", "AdapterSection", "AttentionLossConfig", "ModelConfig", "OutputSection",
           "PretrainConfig", "TrainSection"]
