"""`python -m multicrafter.space --out DIR`: write a Hugging Face Space folder of the app, ready for `hf upload`.

The folder holds app.py, the packages the app imports at run time (multicrafter, annotate, demo, train), the embedded
toy model (multicrafter/assets/toy), the pinned runtime requirements.txt, LICENSE and a README.md with the Space front matter. It
runs the toy model on a CPU Space as it stands; the printed variables switch a GPU Space to FLUX.1-dev.

Files are copied by path from the source checkout (nothing is imported from the other packages), into a temporary
folder beside DIR that is renamed into place at the end, so DIR is never half-written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import ArgumentParser, UserError, run_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("multicrafter", "annotate", "demo", "train")   # everything app.py and the tabs import at run time
FILES = ("app.py", "requirements.txt", "LICENSE")
# Not needed to serve the app: caches, shell recipes, and the toy recipe's stage configs (they start from runs/).
SKIP_NAMES = {"__pycache__", ".pytest_cache", ".ruff_cache", ".DS_Store"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".sh")
SKIP_PATHS = {Path("train/configs/recipe"), Path("multicrafter/assets/toy_vae")}   # the toy VAE: only for training

FLUX = "black-forest-labs/FLUX.1-dev"
FRONT_MATTER = """---
title: {title}
emoji: 🎨
colorFrom: indigo
colorTo: pink
sdk: gradio
sdk_version: {gradio}
python_version: "3.11"
app_file: app.py
license: apache-2.0
short_description: {short}
models:
  - {flux}
  - bytedance-research/UNO
pinned: false
---
"""
SHORT_DESCRIPTION = "Multi-subject generation with disentangled attention"
BODY = """
# {title}

Multi-subject image generation from 1 to 4 reference subjects and a prompt, implementing *MultiCrafter:
High-Fidelity Multi-Subject Generation via Disentangled Attention and Identity-Aware Preference Alignment*
(CVPR 2026) on FLUX with diffusers. Tabs: **Generate**, **Attention** (per-subject attention maps and their
bleeding, with and without the adapter), **Annotate** (build a small training set) and **Train** (off on a Space).

As uploaded, the Space runs the small embedded `toy` model (trained on the procedural ToyWorld, in `multicrafter/assets/toy`) on
CPU hardware. To run {flux} on GPU hardware, set these in the Space's settings:

- variable `MULTICRAFTER_MODEL` = `{flux}`
- variable `MULTICRAFTER_ADAPTER` = {adapter_hint}
- secret `HF_TOKEN`: a token of an account that accepted FLUX.1-dev's license (the model is gated)

`MULTICRAFTER_TRAIN=1` turns the Train tab on (it starts training processes on the Space's machine).
"""


def gradio_version(requirements: Path) -> str:
    """The pinned gradio version of a requirements file (the Space's sdk_version must match it)."""
    for line in requirements.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\s*gradio\s*==\s*([0-9][0-9A-Za-z.+-]*)\s*(#.*)?", line)
        if m:
            return m.group(1)
    raise UserError(f"{requirements} pins no gradio version (a line gradio==X.Y.Z); the Space needs it")


def _skip(rel: Path) -> bool:
    return (rel.name in SKIP_NAMES or rel.name.endswith(SKIP_SUFFIXES) or rel.name.endswith(".egg-info")
            or any(rel == p or p in rel.parents for p in SKIP_PATHS))


def space_files(root: Path = REPO_ROOT) -> list[Path]:
    """Paths (relative to `root`) the Space folder copies, sorted; a missing source is one UserError line."""
    missing = [name for name in (*FILES, *PACKAGES) if not (root / name).exists()]
    if missing:
        raise UserError(f"{root} is not a complete source checkout (missing {', '.join(missing)}); run "
                        "python -m multicrafter.space from a clone of the repository")
    out = [Path(name) for name in FILES]
    for top in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(root / top):
            rel_dir = Path(dirpath).relative_to(root)
            dirnames[:] = sorted(d for d in dirnames if not _skip(rel_dir / d))
            out += [rel_dir / f for f in filenames if not _skip(rel_dir / f)]
    return sorted(out)


def readme(title: str, gradio: str, adapter: str | None) -> str:
    """The Space's README.md: Hugging Face front matter (sdk, models, license) and a short body."""
    hint = f"`{adapter}` (the adapter folder this upload carries)" if adapter else (
        "a MultiCrafter adapter folder inside the Space, e.g. UNO's LoRA converted by\n  "
        "`python -m multicrafter.convert_uno` and added by `python -m multicrafter.space --adapter DIR`")
    fmt = dict(title=title, gradio=gradio, short=SHORT_DESCRIPTION, flux=FLUX, adapter_hint=hint)
    return FRONT_MATTER.format(**fmt) + BODY.format(**fmt)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an output that would overwrite files without --force, or that would delete or nest in the sources."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out == REPO_ROOT or out in REPO_ROOT.parents:
        raise UserError(f"--out {out} holds the source checkout; choose a new folder")
    if any(out == REPO_ROOT / p or (REPO_ROOT / p) in out.parents for p in PACKAGES):
        raise UserError(f"--out {out} is inside a folder the Space copies; choose a folder outside {REPO_ROOT}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty (pass --force to replace it)")


def _adapter_source(adapter: str) -> Path:
    d = Path(adapter).expanduser().resolve()
    if not d.is_dir():
        raise UserError(f"--adapter {adapter}: not a folder")
    if not any((d / f).is_file() for f in ("adapter_config.json", "pytorch_lora_weights.safetensors")):
        raise UserError(f"--adapter {adapter} is not an adapter folder (no adapter_config.json or LoRA weights)")
    return d


def build_space(out: str | os.PathLike, force: bool = False, adapter: str | None = None,
                title: str = "MultiCrafter") -> dict:
    """Write the Space folder at `out`; returns {"out", "files", "bytes", "adapter"} (adapter: its path in the
    Space, or None)."""
    out = Path(out).expanduser().resolve()
    _check_out(out, force)
    files = space_files()
    gradio = gradio_version(REPO_ROOT / "requirements.txt")
    adapter_dir = _adapter_source(adapter) if adapter else None
    adapter_rel = f"adapters/{adapter_dir.name}" if adapter_dir else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, tmp / rel)
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, tmp / adapter_rel)
        (tmp / "README.md").write_text(readme(title, gradio, adapter_rel), encoding="utf-8")
        os.chmod(tmp, 0o755)   # mkdtemp makes it private; a Space folder is an ordinary one
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        count = sum(1 for p in tmp.rglob("*") if p.is_file())
        old = None
        if out.exists():   # empty, or --force: move it aside, put the new folder in place, then delete it
            old = out.parent / f".{out.name}.old-{tmp.name.rsplit('.', 1)[-1]}"
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dict(out=out, files=count, bytes=size, adapter=adapter_rel)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m multicrafter.space`."""
    p = ArgumentParser(prog="python -m multicrafter.space", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the Space folder to write (must be new or empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    p.add_argument("--adapter", default=None,
                   help="an adapter folder to include as adapters/NAME (for FLUX.1-dev on a GPU Space)")
    p.add_argument("--title", default="MultiCrafter", help="the Space's title (README front matter)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the Space folder and print the upload command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not args.title.strip() or "\n" in args.title:
        raise UserError("--title must be one non-empty line")
    info = build_space(args.out, force=args.force, adapter=args.adapter, title=args.title.strip())
    adapter = info["adapter"] or "adapters/NAME (an adapter folder you add; see --adapter)"
    print(f"wrote {info['out']} ({info['files']} files, {info['bytes'] / 1e6:.1f} MB)")
    print("upload it (the Space is created if it does not exist):")
    print(f"  hf upload OWNER/NAME {info['out']} --repo-type space")
    print("it runs the embedded toy model on CPU hardware as it stands; for FLUX.1-dev on GPU hardware set, in the "
          "Space's settings:")
    print(f"  MULTICRAFTER_MODEL={FLUX}")
    print(f"  MULTICRAFTER_ADAPTER={adapter}")
    print("  HF_TOKEN=<a token whose account accepted FLUX.1-dev's license> (as a secret)")
    print("the Train tab is off on a Space; MULTICRAFTER_TRAIN=1 turns it on")
    return 0


if __name__ == "__main__":
    run_cli(main)
