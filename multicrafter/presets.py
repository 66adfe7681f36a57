"""Where models come from: the `tiny` random model, the embedded `toy` model, and any diffusers FLUX folder/hub id.

`tiny` is built deterministically from configs (tests, CI, smoke runs). `toy` is the small FLUX-architecture model
trained on ToyWorld and committed under `multicrafter/assets/toy/` in diffusers layout (with named adapters under `adapters/`).
Everything else goes through diffusers' own `from_pretrained`; offline, a hub id fails with one line that says how
to point at a local folder instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, one_line
from .references import ReferenceOptions
from .vocab import load_tokenizers

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_DIR = Path(os.environ.get("MULTICRAFTER_TOY_DIR", Path(__file__).resolve().parent / "assets" / "toy"))
PRESETS = ("tiny", "toy")

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=4,
    block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
    use_post_quant_conv=False,
)
# Reference sizes scale with the model: UNO's 512/320 for FLUX, small ones for the tiny and toy models.
TINY_REFERENCE_SIZES = dict(long_side_single=64, long_side_multi=48)
REFERENCE_CONFIG = "multicrafter_references.json"   # optional file in a model folder overriding the sizes
# Optional file in a model folder: the sampling arguments the model was trained for. A base trained from scratch with
# one constant guidance embedding (the toy model: 1.0) only understands that value, unlike guidance-distilled FLUX.1-dev.
SAMPLING_CONFIG = "multicrafter_sampling.json"
SAMPLING_KEYS = ("guidance_scale", "num_inference_steps", "height", "width", "max_sequence_length", "true_cfg_scale",
                 "negative_prompt")

FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


def build_tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A random FLUX-architecture model, identical for a given seed: FluxPipeline's seven components."""
    # Model classes only this builder needs: the app's state and the CLIs read presets without loading them.
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = load_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, projection_dim=32, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id,
        ))
    components = dict(
        transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    )
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = components[name] if dtype == torch.float32 else components[name].to(dtype)
        components[name] = module.eval().requires_grad_(False)
    return components


def resolve_model_path(name: str) -> str:
    """Map a preset name to a folder, keep local folders, and pass hub ids through."""
    if name == "toy":
        if not (TOY_DIR / "model_index.json").exists():
            raise UserError(
                f"the embedded toy model is not available: {TOY_DIR} has no model_index.json "
                "(train it with train/configs/toy_*.yaml, or use --model tiny)"
            )
        return str(TOY_DIR)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "model_index.json").exists():
            raise UserError(f"{p} is not a diffusers pipeline folder (no model_index.json)")
        return str(p)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise UserError(f"unknown model '{name}': use tiny, toy, a local diffusers folder or a hub id like owner/name")
    return name


def load_error(name: str, exc: Exception) -> UserError:
    """One line for a model that could not be loaded (typically: offline and not in the local cache)."""
    text = str(exc)
    if "cache" in text or "connect" in text.lower() or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        why = "not in the local cache and the Hub cannot be reached"
    else:
        why = one_line(exc)[:200]
    return UserError(
        f"model '{name}' is unavailable ({why}); download it once with `hf download {name} --local-dir DIR` "
        "and pass the folder instead"
    )


MANIFEST = "manifest.json"   # written by train.assemble_toy: the folder's adapters and which one loads by default


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """A model folder's manifest.json as a dict; {} when it is missing or unreadable (it only adds to a folder)."""
    try:
        data = json.loads((Path(model_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def default_adapter_for(model_dir: str | Path) -> str | None:
    """The adapter a model folder loads when none is asked for: its manifest's `default_adapter` (null: the base
    alone), else `ippo` when the folder ships one (the paper's full method), else none. Why a manifest entry: the
    best shipped row is a measured fact of each assembly (a base that scores above every row ships with no default
    adapter), not a name."""
    folder = Path(model_dir)
    data = read_manifest(folder)
    if "default_adapter" in data:
        name = data["default_adapter"]
        if name is None:
            return None
        if isinstance(name, str) and (folder / "adapters" / name).is_dir():
            return name
        raise UserError(f"{folder / MANIFEST}: default_adapter {name!r} is not one of the folder's adapters")
    return "ippo" if (folder / "adapters" / "ippo").is_dir() else None


def sampling_defaults_for(model_dir: str | Path) -> dict[str, Any]:
    """A model folder's own sampling defaults (`multicrafter_sampling.json`), {} when it has none."""
    p = Path(model_dir) / SAMPLING_CONFIG
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
    except ValueError as exc:
        raise UserError(f"bad {p}: {one_line(exc)}") from None
    unknown = sorted(set(data) - set(SAMPLING_KEYS))
    if unknown:
        raise UserError(f"bad {p}: unknown key(s) {', '.join(unknown)} (known: {', '.join(SAMPLING_KEYS)})")
    return data


def true_cfg_arguments(scale: float, label: str = "--true-cfg", negative_prompt: str = "") -> dict[str, Any]:
    """Pipeline arguments for true CFG against `negative_prompt` (FluxPipeline needs one for a second call);
    scale 1 = off. One place for the rule the CLIs, the evaluator and the toy assembly share."""
    if not (math.isfinite(scale) and scale >= 1.0):
        raise UserError(f"{label} must be >= 1 (1 = off), got {scale}")
    return {"true_cfg_scale": float(scale), "negative_prompt": negative_prompt} if scale > 1 else {"true_cfg_scale": 1.0}


def reference_options_for(model_dir: str) -> ReferenceOptions:
    """Reference sizing for a model folder: its `multicrafter_references.json` if present, else UNO's defaults."""
    p = Path(model_dir) / REFERENCE_CONFIG
    if Path(model_dir).is_dir() and p.exists():
        try:
            return ReferenceOptions(**json.loads(p.read_text()))
        except (ValueError, TypeError) as exc:
            raise UserError(f"bad {p}: {exc}") from None
    return ReferenceOptions()
