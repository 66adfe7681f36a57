"""Building a base model from scratch (how the offline toy model is made), used by `train.pretrain` only when the config
asks for it: `model.init_transformer`, `model.vae`, `model.t5_relative_buckets`, `train.train_text_encoders`, and the
`base`-mode save of a whole pipeline.

The paper's recipe starts from a trained FLUX and trains only the adapter; none of this runs then. The toy has no
pretrained base, so its transformer starts random, its VAE is trained separately (`train.vae`), and its random text
side is trained with the transformer (a frozen random T5 is a bag of words that cannot say which colour is whose).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from multicrafter.errors import UserError
from multicrafter.io import staged_dir
from multicrafter.presets import REFERENCE_CONFIG, SAMPLING_CONFIG

from .pretrain_config import ModelConfig

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# ------------------------------------------------------------------------------------------------ building the base


def build_base(pipe, cfg: ModelConfig, seed: int, device: torch.device | str) -> None:
    """Rebuild what `cfg` asks for, in place: another VAE, a fresh random transformer, a new T5 position bias."""
    if cfg.vae is not None:
        replace_vae(pipe, cfg.vae, device)
    if cfg.init_transformer is not None:
        init_transformer(pipe, cfg.init_transformer, seed, device)
    if cfg.t5_relative_buckets is not None:
        new = rebuild_t5_position_bias(pipe.text_encoder_2, cfg.t5_relative_buckets, cfg.t5_local_heads,
                                       seed=seed + 3)
        if new is not pipe.text_encoder_2:
            pipe.register_modules(text_encoder_2=new.to(device).eval().requires_grad_(False))


def replace_vae(pipe, folder: str, device: torch.device | str) -> None:
    """Swap in the diffusers AutoencoderKL saved in `folder` (e.g. the toy VAE) and the pipeline's scale factor."""
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"model.vae: {folder} is not a diffusers AutoencoderKL folder (no config.json)")
    try:
        vae = AutoencoderKL.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.vae: cannot load {folder}: {exc}") from None
    vae = vae.to(device, pipe.vae.dtype).eval().requires_grad_(False)
    pipe.register_modules(vae=vae)
    pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)


def init_transformer(pipe, spec: dict[str, Any], seed: int, device: torch.device | str) -> None:
    """Replace the transformer by a fresh random FluxTransformer2DModel with the config keys in `spec` (seeded);
    in_channels, joint_attention_dim, pooled_projection_dim and guidance_embeds default to the loaded model's."""
    old = pipe.transformer.config
    kwargs = {k: old[k] for k in ("in_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")}
    kwargs.update(spec)
    if "axes_dims_rope" in kwargs:
        kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = FluxTransformer2DModel(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"model.init_transformer: cannot build FluxTransformer2DModel({kwargs}): {exc}") from None
    dtype = pipe.transformer.dtype
    fresh = (fresh if dtype == torch.float32 else fresh.to(dtype)).to(device)
    pipe.register_modules(transformer=fresh.eval().requires_grad_(False))


def local_position_bias(num_buckets: int, num_heads: int, max_distance: int, strength: float = 6.0) -> torch.Tensor:
    """(num_buckets, num_heads) T5 relative-position bias where head h attends to one window of neighbours: even
    heads before the word, odd heads after it, rings of offsets 1-3, 4-8, 9-16, ... (`strength` inside, 0 outside)."""
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
    if old is None or not isinstance(old, T5EncoderModel):
        raise UserError("model.t5_relative_buckets: this model has no T5 text encoder")
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


# ------------------------------------------------------------------------------------------------ training the text side


def unfreeze_text_encoders(pipe) -> dict[str, torch.nn.Parameter]:
    """Make both text encoders trainable; their weights by checkpoint name (`text_encoder.…`, `text_encoder_2.…`).
    They stay in eval mode: no dropout, as at inference."""
    named = {}
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        module.requires_grad_(True)
        for n, p in module.named_parameters():
            named[f"{name}.{n}"] = p
    return named


def encode_captions(pipe, captions: list[str], dropped: torch.Tensor, max_sequence_length: int,
                    device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and pooled embeddings with gradients into the text encoders; a dropped caption is the empty one, as in
    the cached path."""
    prompts = ["" if d else c for c, d in zip(captions, dropped.tolist())]
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)
    return embeds.to(dtype), pooled.to(dtype)


def average_text_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """All-reduce the text encoders' gradients (only the transformer is wrapped by DDP)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, "mean")


# ------------------------------------------------------------------------------------------------ saving the base


def save_pipeline(pipe, target: Path, reference_sizes: dict[str, int | None], sampling: dict[str, Any]) -> Path:
    """`save_pretrained` plus the reference sizes and sampling defaults the base was trained with, written next to
    `target` and swapped in, so `target` is never a half-written model."""
    with staged_dir(target) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / REFERENCE_CONFIG).write_text(json.dumps(reference_sizes) + "\n")
        if sampling:
            (tmp / SAMPLING_CONFIG).write_text(json.dumps(sampling) + "\n")
    return target


__all__ = ["average_text_gradients", "build_base", "encode_captions", "init_transformer", "local_position_bias",
           "rebuild_t5_position_bias", "replace_vae", "save_pipeline", "unfreeze_text_encoders"]
