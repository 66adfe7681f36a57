"""`python -m annotate.validate DATASET`: check a dataset and print every problem with its metadata.jsonl line.

Exit 0 when the dataset is valid (warnings such as orphan files left by an interrupted save never block), 1 with one
line per problem otherwise. The checks themselves are `multicrafter.dataset_format.check_dataset`, the same ones
the trainer runs before it reads a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

from multicrafter.dataset_format import check_dataset, errors_of
from multicrafter.errors import ArgumentParser, run_cli

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Print every problem, then a summary line; 0 if the dataset has no errors, else 1."""
    parser = ArgumentParser(prog="python -m annotate.validate", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="dataset folder holding metadata.jsonl, images/, masks/, refs/")
    args = parser.parse_args(argv)
    records, problems = check_dataset(args.dataset)
    for p in problems:
        print(p)
    n_err = len(errors_of(problems))
    print(f"{args.dataset}: {len(records)} samples, {n_err} errors, {len(problems) - n_err} warnings"
          + ("" if n_err else " - valid"))
    return 1 if n_err else 0


if __name__ == "__main__":
    run_cli(main)
