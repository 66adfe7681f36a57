"""`python -m multicrafter.eval table A.json B.json ...`: the ablation table from `eval toy --json` results.

One row per result (mean ± std over its seeds), the per-attribute accuracies and the similar-pair columns, so the
README table is printed from the measured files rather than typed. `--against NAME` adds, per row, each headline
metric's difference to that row in units of the larger of the two seed-to-seed stds (|d| > 1: beyond the spread).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import ArgumentParser, UserError, run_cli

HEADLINE = ("id_sim", "leakage", "layout", "quality", "overall")
ACCURACY = ("acc_shape", "acc_colour", "acc_pattern")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m multicrafter.eval table",
                       description="Markdown ablation table from `python -m multicrafter.eval toy --json` files.")
    p.add_argument("results", nargs="+", metavar="JSON", help="eval toy --json files, one row each, in this order")
    p.add_argument("--against", default=None, metavar="NAME",
                   help="row to compare every other row with, in seed-std units (its adapter name, or 'no adapter')")
    return p


def load_result(path: str | Path) -> dict:
    p = Path(path)
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {p}: {exc}") from None
    missing = [k for k in (*HEADLINE, "std", "seeds", "n_scenes") if k not in res]
    if missing:
        raise UserError(f"{p} is not an `eval toy --json` result (missing {', '.join(missing)})")
    adapter = res.get("adapter")
    res.setdefault("name", "no adapter" if adapter in (None, "none") else str(adapter))
    return res


def spread_units(row: dict, ref: dict, metric: str) -> float:
    """Difference row - ref in units of the larger seed std of the two (inf when both stds are 0)."""
    d = row[metric] - ref[metric]
    s = max(row["std"][metric], ref["std"][metric])
    return d / s if s > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))


def table(results: list[dict], against: str | None = None) -> str:
    ref = None
    if against is not None:
        ref = next((r for r in results if r["name"] == against), None)
        if ref is None:
            raise UserError(f"--against {against}: no row of that name ({', '.join(r['name'] for r in results)})")
    head = ["row", "scenes x seeds", *HEADLINE, "shape acc", "colour acc", "pattern acc",
            "similar pairs: ID-Sim", "similar pairs: leakage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["name"], f"{r['n_scenes']} x {len(r['seeds'])}"]
        cells += [f"{r[m]:.3f} ± {r['std'][m]:.3f}" for m in HEADLINE]
        cells += [f"{r[m]:.3f}" if m in r else "-" for m in ACCURACY]
        sp = r.get("similar_pairs") or {}
        cells += [f"{sp[k]:.3f}" if sp.get("n") and k in sp else "-" for k in ("id_sim", "leakage")]
        lines.append("| " + " | ".join(cells) + " |")
    if ref is not None:
        lines.append("")
        lines.append(f"Difference to `{ref['name']}` in seed-std units (|x| > 1: beyond the seed-to-seed spread):")
        lines.append("")
        lines.append("| row | " + " | ".join(HEADLINE) + " |")
        lines.append("|" + "---|" * (len(HEADLINE) + 1))
        for r in results:
            if r is not ref:
                lines.append(f"| {r['name']} | " + " | ".join(f"{spread_units(r, ref, m):+.1f}" for m in HEADLINE)
                             + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(table([load_result(p) for p in args.results], args.against))
    return 0


if __name__ == "__main__":
    run_cli(main)
