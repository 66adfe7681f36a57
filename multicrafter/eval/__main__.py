"""Dispatch `python -m multicrafter.eval {toy,denoise,faces,figures,table} ...` to the matching module's `main(argv)`."""

from __future__ import annotations

import sys

from ..errors import run_cli

USAGE = "usage: python -m multicrafter.eval {toy,denoise,faces,figures,table} [options]   (add --help after the mode for its options)"


def main(argv: list[str] | None = None) -> int:
    """Run one evaluation mode; `--help` (or nothing) lists the modes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("  toy    score a model (or the ground-truth renders) on held-out ToyWorld scenes")
        print("  denoise  one-step clean-image predictions per noise level (what the model cannot decide at high noise)")
        print("  faces  Hungarian-matched face similarity of a generated image against reference photos")
        print("  figures  README figures of the toy ablation (contact sheet across adapters, attention with/without Dice)")
        print("  table  the ablation table (mean ± std, seed-std differences) from eval toy --json files")
        return 0
    mode, rest = argv[0], argv[1:]
    # Each mode imports only its own module: `table` and `faces` start without loading the diffusion stack.
    if mode == "toy":
        from .toyworld_scores import main as mode_main
    elif mode == "denoise":
        from .denoise import main as mode_main
    elif mode == "faces":
        from .faces_cli import main as mode_main
    elif mode == "figures":
        from .figures import main as mode_main
    elif mode == "table":
        from .ablation_table import main as mode_main
    else:
        print(f"error: unknown evaluation mode '{mode}' (expected toy, denoise, faces, figures or table)", file=sys.stderr)
        return 2
    return mode_main(rest) or 0


if __name__ == "__main__":
    run_cli(main)
