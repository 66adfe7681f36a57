"""Assemble the embedded toy model: `python -m train.assemble_toy --base DIR --adapter NAME=DIR ... --out multicrafter/assets/toy`.

The toy model ships as one diffusers pipeline folder (what `MultiCrafterPipeline.from_pretrained("toy")` loads) with
its named adapters under `adapters/` (baseline, attn, attn_moe, ippo: the paper's ablation rows). Only safetensors
and JSON are copied; the folder is built beside the target and swapped in, so a failed assembly changes nothing.
`--update` keeps an existing assembly and adds or replaces adapters (how the IPPO row is added last).
`--default-adapter NAME|none` records which adapter `from_pretrained("toy")` and the app load when none is asked
for (manifest.json; kept on --update; without an entry: ippo when shipped).
The transformer and the adapters are stored in float16 (keeps the whole model under 40 MB and every file under 20 MB;
images differ from float32 storage by < 5e-4 of the pixel range) and are cast back to the model's dtype when loaded;
the VAE and text encoders stay in float32.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multicrafter.errors import ArgumentParser, UserError, run_cli
from multicrafter.io import staged_dir
from multicrafter.presets import MANIFEST, SAMPLING_CONFIG, read_manifest, true_cfg_arguments

MAX_BYTES = 40 * 2**20
KEEP_SUFFIXES = (".safetensors", ".json", ".txt", ".md")


def _copy_tree(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.suffix in KEEP_SUFFIXES and not any(part.startswith(".") for part in p.parts):
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
            if p.suffix == ".json":  # save_pretrained records where the weights were loaded from: a local path
                cfg = json.loads(p.read_text())
                if isinstance(cfg, dict) and cfg.pop("_name_or_path", None) is not None:
                    target.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def to_half(folder: Path) -> None:
    """Rewrite every safetensors file under `folder` with float32 tensors stored as float16 (metadata kept)."""
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata()
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
        sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}
        save_file(sd, str(f), metadata=meta)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def set_true_cfg(folder: Path, scale: float) -> None:
    """Record true classifier-free guidance (against the empty prompt) in the folder's sampling defaults; 1 = off.

    Why: the toy base is trained with 10 % empty captions, so it has an unconditional branch, and at 20 steps its
    conditional samples are washed out (held-out overall 0.521 without, 0.570 with a scale of 3; runs/toy_notes.md)."""
    arguments = true_cfg_arguments(scale)  # checks the value
    path = folder / SAMPLING_CONFIG
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.pop("true_cfg_scale", None)
    data.pop("negative_prompt", None)
    if scale > 1.0:
        data.update(arguments)
    path.write_text(json.dumps(data) + "\n")


def assemble(out: Path, base: Path | None, adapters: dict[str, Path], update: bool, notes: str | None,
             true_cfg: float | None = None, default_adapter: str | None = None) -> Path:
    """Build the folder beside `out` and swap it in. `default_adapter`: a shipped adapter's name, "none" (the base
    alone) or None (keep the existing manifest's choice)."""
    if base is None and not update:
        raise UserError("--base is required unless --update")
    if base is not None and not (base / "model_index.json").is_file():
        raise UserError(f"{base} is not a pipeline folder (no model_index.json)")
    if update and not (out / "model_index.json").is_file():
        raise UserError(f"--update: {out} holds no assembled model yet")
    for name, d in adapters.items():
        if not (d / "adapter_config.json").is_file():
            raise UserError(f"adapter {name}: {d} is not an adapter folder (no adapter_config.json)")
    with staged_dir(out) as tmp:
        _copy_tree(out if update else base, tmp)
        if update and base is not None:
            _copy_tree(base, tmp)
        if base is not None:
            to_half(tmp / "transformer")
        for name, d in adapters.items():
            shutil.rmtree(tmp / "adapters" / name, ignore_errors=True)
            _copy_tree(d, tmp / "adapters" / name)
            to_half(tmp / "adapters" / name)
        manifest = {"adapters": sorted(p.name for p in (tmp / "adapters").iterdir()) if (tmp / "adapters").is_dir()
                    else []}
        previous = read_manifest(tmp)  # the copied assembly's (on --update)
        if default_adapter is None and "default_adapter" in previous:
            default_adapter = previous["default_adapter"] or "none"
        if default_adapter is not None:
            if default_adapter != "none" and default_adapter not in manifest["adapters"]:
                raise UserError(f"--default-adapter {default_adapter}: not one of the adapters "
                                f"({', '.join(manifest['adapters']) or 'none shipped'}); use none for the base alone")
            manifest["default_adapter"] = None if default_adapter == "none" else default_adapter
        if true_cfg is not None:
            set_true_cfg(tmp, true_cfg)
        if notes:
            (tmp / "TRAINING.md").write_text(Path(notes).read_text())
        (tmp / MANIFEST).unlink(missing_ok=True)
        manifest["bytes"] = folder_bytes(tmp)  # everything but the manifest itself, after the last write
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        size = manifest["bytes"] + (tmp / MANIFEST).stat().st_size
        if size > MAX_BYTES:
            raise UserError(f"the assembled toy model is {size / 2**20:.1f} MB, over the {MAX_BYTES // 2**20} MB budget")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m train.assemble_toy", description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="the base pipeline folder (train.pretrain base mode: OUTPUT/pipeline)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a named adapter (repeat)")
    ap.add_argument("--out", default="multicrafter/assets/toy")
    ap.add_argument("--update", action="store_true", help="add/replace adapters of an existing assembly")
    ap.add_argument("--notes", default=None, help="a markdown file with the exact training commands, copied in")
    ap.add_argument("--default-adapter", default=None, metavar="NAME|none",
                    help="the adapter loaded when none is asked for (none: the base alone; default: keep, else ippo)")
    ap.add_argument("--true-cfg", type=float, default=None, metavar="SCALE",
                    help="sampling default: true CFG against the empty prompt (1 = off; default: leave as is)")
    args = ap.parse_args(argv)
    adapters = {}
    for item in args.adapter:
        name, sep, d = item.partition("=")
        if not sep or not name.isidentifier():
            raise UserError(f"--adapter wants NAME=DIR, got {item!r}")
        adapters[name] = Path(d)
    out = assemble(Path(args.out), Path(args.base) if args.base else None, adapters, args.update, args.notes,
                   args.true_cfg, args.default_adapter)
    shipped = sorted(p.name for p in (out / "adapters").iterdir() if p.is_dir()) if (out / "adapters").is_dir() else []
    print(f"assembled {out} ({folder_bytes(out) / 2**20:.1f} MB; adapters: {', '.join(shipped) or 'none (base only)'})")
    return 0


if __name__ == "__main__":
    run_cli(main)
