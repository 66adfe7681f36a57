"""`python -m multicrafter.toyworld --out DIR --n N --seed S [--split train|test]`: write a ToyWorld dataset."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import ArgumentParser, UserError, run_cli
from ..io import save_image_atomic
from .make_dataset import build_sample, contact_sheet, write_dataset
from .scenes import subject_counts


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = ArgumentParser(prog="python -m multicrafter.toyworld",
                                description="Write a ToyWorld dataset (the project's dataset format: images, masks, "
                                            "refs, metadata.jsonl with each scene spec under 'toyworld').")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="identity split: test identities never appear in train scenes")
    p.add_argument("--size", type=int, default=128, help="scene size in pixels (multiple of 16)")
    p.add_argument("--ref-size", type=int, default=64, help="reference size in pixels")
    p.add_argument("--subjects", type=subject_counts, default=(2, 3), help="subject counts to draw from, e.g. 2,3 or 1,2,3,4")
    p.add_argument("--similar-prob", type=float, default=0.3,
                   help="probability that a scene contains a similar pair (same shape+pattern or same colours)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--workers", type=int, default=1, help="render in this many processes (same bytes as one)")
    p.add_argument("--contact-sheet", metavar="PNG", help="also write a contact sheet of the first scenes")
    p.add_argument("--sheet-rows", type=int, default=6)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dataset (and optionally a contact sheet of its first scenes); returns the exit code."""
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.similar_prob <= 1.0:
        raise UserError(f"--similar-prob must be in [0, 1], got {args.similar_prob}")
    kwargs = {"n_subjects": args.subjects, "similar_prob": args.similar_prob}
    meta = write_dataset(args.out, args.n, seed=args.seed, split=args.split, size=args.size,
                         ref_size=args.ref_size, overwrite=args.overwrite, workers=args.workers, **kwargs)
    print(f"wrote {args.n} scenes to {meta.parent} ({args.split} identities, seed {args.seed})")
    if args.contact_sheet:
        rows = [build_sample(args.seed, i, split=args.split, size=args.size, ref_size=args.ref_size, **kwargs)
                for i in range(min(args.sheet_rows, args.n))]
        if not rows:
            raise UserError("--contact-sheet needs --n >= 1")
        save_image_atomic(contact_sheet(rows), args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    run_cli(main)
