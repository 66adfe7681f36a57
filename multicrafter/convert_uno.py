"""`python -m multicrafter.convert_uno --in dit_lora.safetensors --out DIR`: UNO's released LoRA as our adapter.

UNO (the paper's ablation baseline) ships a LoRA for FLUX.1-dev with keys
  double_blocks.{i}.processor.{qkv_lora1,proj_lora1,qkv_lora2,proj_lora2}.{down,up}.weight
  single_blocks.{i}.processor.{qkv_lora,proj_lora}.{down,up}.weight
each adding up(down(x)) with scale 1 (no network alpha). `qkv_lora1`/`proj_lora1` act on the image stream's fused
q|k|v and output projections, `qkv_lora2`/`proj_lora2` on the text stream's; in single blocks `qkv_lora` acts on the
q|k|v part of the first linear and `proj_lora` on the output linear (input: attention output + MLP activation).
Diffusers splits the fused projections, so a fused q|k|v LoRA becomes three LoRAs sharing A = down, each with its row
block of up as B. Rank comes from the file; alpha = rank gives UNO's scale of 1. The result is an adapter folder
(LoRA readable by stock `FluxPipeline.load_lora_weights`) marked with UNO's reference style and sampling defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors import safe_open

from .adapters import AdapterConfig, base_linear, lora_config_metadata, write_adapter_dir
from .errors import ArgumentParser, UserError, run_cli
from .presets import TINY_TRANSFORMER, load_error, resolve_model_path

_KEY = re.compile(r"^(?P<kind>double|single)_blocks\.(?P<i>\d+)\.processor\.(?P<lora>\w+)\.(?P<ab>down|up)\.weight$")
# (block kind, UNO LoRA name) -> diffusers module suffixes; several suffixes = a fused projection split by rows.
MAPPING = {
    ("double", "qkv_lora1"): ["attn.to_q", "attn.to_k", "attn.to_v"],
    ("double", "proj_lora1"): ["attn.to_out.0"],
    ("double", "qkv_lora2"): ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    ("double", "proj_lora2"): ["attn.to_add_out"],
    ("single", "qkv_lora"): ["attn.to_q", "attn.to_k", "attn.to_v"],
    ("single", "proj_lora"): ["proj_out"],
}
BLOCKS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
# UNO's inference defaults (its README / inference script): 512x512, 25 steps, guidance 4, and its own time schedule.
UNO_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 4.0, "height": 512, "width": 512, "schedule": "uno"}


def uno_sigmas(num_steps: int, height: int, width: int) -> list[float]:
    """UNO's denoising schedule, without the terminal 0: `num_steps` sigmas from 1 down.

    As UNO's sampler: t = linspace(1, 0, steps + 1), shifted by t' = e^mu / (e^mu + 1/t - 1) with mu linear in the
    sequence length, 0.5 at 256 and 1.15 at 4096. UNO takes the sequence length as (W // 8) * (H // 8) // 256
    (16 at 512x512, 64 at 1024x1024), where FluxPipeline uses the packed token count (1024, 4096); so UNO's shift
    is smaller (middle sigma of 25 steps at 1024x1024: 0.634, FluxPipeline's 0.774).
    """
    if num_steps < 1:
        raise UserError(f"the UNO schedule needs at least 1 step, got {num_steps}")
    seq_len = (width // 8) * (height // 8) // (16 * 16)
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = 0.5 + slope * (seq_len - 256)
    out = []
    for i in range(num_steps):
        t = 1.0 - i / num_steps
        out.append(math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)))
    return out


def parse_uno_key(key: str) -> re.Match | None:
    """The parts (`kind`, `i`, `lora`, `ab`) of one of UNO's LoRA keys, or None for any other key."""
    m = _KEY.match(key)
    return m if m is not None and (m["kind"], m["lora"]) in MAPPING else None


def convert_state_dict(uno: dict[str, torch.Tensor], base: torch.nn.Module) -> tuple[dict, int]:
    """UNO keys -> diffusers peft keys `<module>.lora_A.weight` / `.lora_B.weight`; checks every shape against the
    base model's linears (seen through any loaded LoRA or MoE-LoRA wrapper)."""
    pairs: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, t in uno.items():
        m = parse_uno_key(key)
        if m is None:
            raise UserError(f"not a UNO LoRA key: {key!r}")
        pairs.setdefault((m["kind"], m["i"], m["lora"]), {})[m["ab"]] = t
    ranks = set()
    out: dict[str, torch.Tensor] = {}
    for (kind, i, lora), ab in sorted(pairs.items()):
        where = f"{kind}_blocks.{i}.processor.{lora}"
        if set(ab) != {"down", "up"}:
            raise UserError(f"{where} lacks its {'up' if 'down' in ab else 'down'} weight")
        down, up = ab["down"], ab["up"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise UserError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair")
        ranks.add(down.shape[0])
        targets = [f"{BLOCKS[kind]}.{i}.{suffix}" for suffix in MAPPING[(kind, lora)]]
        linears = {t: base_linear(base, t) for t in targets}
        shapes = {t: (lin.in_features, lin.out_features) for t, lin in linears.items() if lin is not None}
        missing = [t for t in targets if t not in shapes]
        if missing:
            raise UserError(f"{where}: the base model has no {missing[0]} (block count does not fit)")
        fin = {shapes[t][0] for t in targets}
        outs = [shapes[t][1] for t in targets]
        if fin != {down.shape[1]} or sum(outs) != up.shape[0]:
            raise UserError(f"{where}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the base "
                            f"model ({fin.pop()} -> {sum(outs)})")
        rows = up.split(outs, dim=0)
        for target, b in zip(targets, rows):
            out[f"{target}.lora_A.weight"] = down.clone()  # shared A, stored once per module
            out[f"{target}.lora_B.weight"] = b.contiguous()
    if len(ranks) != 1:
        raise UserError(f"UNO LoRA with mixed ranks {sorted(ranks)} is not supported")
    return out, ranks.pop()


def flux_dev_skeleton() -> torch.nn.Module:
    """FLUX.1-dev's transformer on the meta device: shapes to check against, no memory, no download."""
    with torch.device("meta"):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )


def convert(uno_path: str | Path, out_dir: str | Path, base: torch.nn.Module, source: str | None = None) -> Path:
    """Convert and write an adapter folder; nothing is written if any key or shape is refused. `source` (e.g. the
    Hub repository the file came from) is recorded in the adapter config's `extra.converted_from`."""
    uno_path = Path(uno_path)
    if not uno_path.is_file():
        raise UserError(f"UNO checkpoint not found: {uno_path}")
    try:
        with safe_open(str(uno_path), framework="pt") as f:
            uno = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read {uno_path.name} as safetensors ({type(exc).__name__})") from None
    if not uno:
        raise UserError(f"{uno_path.name} holds no tensors")
    sd, rank = convert_state_dict(uno, base)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    targets = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    meta = lora_config_metadata(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules))
    extra = {"reference_style": "uno", "source": "UNO", "sampling_defaults": dict(UNO_DEFAULTS)}
    if source:
        extra["converted_from"] = source
    cfg = AdapterConfig(lora_rank=rank, lora_alpha=float(rank), lora_targets=targets, extra=extra)
    return write_adapter_dir(out_dir, cfg, sd, meta)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m multicrafter.convert_uno --in dit_lora.safetensors --out DIR`."""
    ap = ArgumentParser(prog="python -m multicrafter.convert_uno", description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="src", required=True, help="UNO's dit_lora.safetensors")
    ap.add_argument("--out", required=True, help="adapter folder to write")
    ap.add_argument("--base", default="flux-dev",
                    help="model whose shapes the LoRA must fit: flux-dev (default, no download), tiny, or a folder")
    args = ap.parse_args(argv)
    # Only the transformer's shapes matter: it is built on the meta device from its config, no weights read.
    if args.base == "flux-dev":
        base = flux_dev_skeleton()
    elif args.base == "tiny":
        with torch.device("meta"):
            base = FluxTransformer2DModel(**TINY_TRANSFORMER)
    else:
        folder = resolve_model_path(args.base)
        try:
            config = FluxTransformer2DModel.load_config(folder, subfolder="transformer")
        except (OSError, ValueError) as exc:
            raise load_error(args.base, exc) from None
        with torch.device("meta"):
            base = FluxTransformer2DModel.from_config(config)
    out = convert(args.src, args.out, base)
    print(f"wrote UNO adapter to {out} (load with --adapter {out})")
    return 0


if __name__ == "__main__":
    run_cli(main)
