"""`python -m multicrafter.eval table A.json B.json ...`: the ablation table from `eval toy --json` results.

One row per result (mean ± std over its seeds), the per-attribute accuracies and the similar-pair columns, so the
README table is printed from the measured files rather than typed. `--against NAME` adds, per row, each headline
metric's difference to that row in units of the larger of the two seed-to-seed stds (|d| > 1: beyond the spread).
`--plot PNG` draws every row as a point, leakage against ID-Sim with seed-std bars: the trade-off at a glance.
A file may also hold several rows (`{"rows": [...]}`, each an `eval toy --json` result or the part of one that was
recorded); metrics a row lacks print as "-".
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ArgumentParser, UserError, run_cli
from ..io import save_image_atomic

HEADLINE = ("id_sim", "leakage", "layout", "quality", "overall", "reward")  # reward: IPPO's composite
ACCURACY = ("acc_shape", "acc_colour", "acc_pattern")
PAIRED = ("id_sim", "leakage", "reward")
SAME_SCENES = ("seeds", "n_scenes", "scene_seed", "prompts", "subjects", "similar_prob", "size", "ref_size")


def build_parser() -> argparse.ArgumentParser:
    """The `eval table` command line."""
    p = ArgumentParser(prog="python -m multicrafter.eval table",
                       description="Markdown ablation table from `python -m multicrafter.eval toy --json` files.")
    p.add_argument("results", nargs="+", metavar="JSON", help="eval toy --json files, one row each, in this order")
    p.add_argument("--against", default=None, metavar="NAME",
                   help="row to compare every other row with, in seed-std units (its adapter name, or 'no adapter')")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw leakage against ID-Sim, one point per row")
    p.add_argument("--title", default="", help="title of the --plot figure")
    return p


REQUIRED = ("id_sim", "leakage", "std", "seeds", "n_scenes")


def _checked(res: object, where: str) -> dict:
    missing = [k for k in REQUIRED if not isinstance(res, dict) or k not in res]
    if missing:
        raise UserError(f"{where} is not an `eval toy --json` result (missing {', '.join(missing)})")
    if not isinstance(res["std"], dict) or not isinstance(res["seeds"], list):
        raise UserError(f"{where} is not an `eval toy --json` result (std must be an object, seeds a list)")
    adapter = res.get("adapter")
    res.setdefault("name", "no adapter" if adapter in (None, "none") else str(adapter))
    return res


def load_results(path: str | Path) -> list[dict]:
    """The rows in one file: an `eval toy --json` result, or `{"rows": [result, ...]}`."""
    p = Path(path)
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {p}: {exc}") from None
    if isinstance(res, dict) and isinstance(res.get("rows"), list):
        if not res["rows"]:
            raise UserError(f"{p} has no rows")
        return [_checked(r, f"{p} row {i}") for i, r in enumerate(res["rows"])]
    return [_checked(res, str(p))]


def load_result(path: str | Path) -> dict:
    """The one row of an `eval toy --json` file."""
    rows = load_results(path)
    if len(rows) != 1:
        raise UserError(f"{path} holds {len(rows)} rows, not one")
    return rows[0]


def spread_units(row: dict, ref: dict, metric: str) -> float:
    """Difference row - ref in units of the larger seed std of the two (inf when both stds are 0, nan when a row
    lacks the metric or its std)."""
    if any(metric not in r or metric not in r["std"] for r in (row, ref)):
        return math.nan
    d = row[metric] - ref[metric]
    s = max(row["std"][metric], ref["std"][metric])
    return d / s if s > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))


def _mean_std(r: dict, m: str) -> str:
    if m not in r:
        return "-"
    return f"{r[m]:.3f} ± {r['std'][m]:.3f}" if m in r["std"] else f"{r[m]:.3f}"


def paired_differences(row: dict, ref: dict, metric: str) -> list[float] | None:
    """row - ref per generator seed (the same held-out scenes drawn with the same noise move together, so the paired
    gap is the sharper test); None unless both rows kept per-seed values of the same scenes and seeds."""
    a, b = row.get("per_seed", {}).get(metric), ref.get("per_seed", {}).get(metric)
    if a is None or b is None or any(row.get(k) != ref.get(k) for k in SAME_SCENES):
        return None
    return [x - y for x, y in zip(a, b, strict=True)]


def _paired_cell(row: dict, ref: dict, metric: str) -> str:
    d = paired_differences(row, ref, metric)
    return "-" if d is None else " / ".join(f"{x:+.3f}" for x in d)


def _units(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:+.1f}"


def table(results: list[dict], against: str | None = None) -> str:
    """The Markdown ablation table, one row per result; `against` adds seed-std differences to that row."""
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
        cells += [_mean_std(r, m) for m in HEADLINE]
        cells += [f"{r[m]:.3f}" if m in r else "-" for m in ACCURACY]
        sp = r.get("similar_pairs") or {}
        cells += [f"{sp[k]:.3f}" if sp.get("n") and k in sp else "-" for k in ("id_sim", "leakage")]
        lines.append("| " + " | ".join(cells) + " |")
    if ref is not None:
        lines.append("")
        lines.append(f"Difference to `{ref['name']}` in seed-std units (|x| > 1: beyond the seed-to-seed spread), "
                     "and per generator seed where both rows were scored with the same seeds (paired):")
        lines.append("")
        lines.append("| row | " + " | ".join(HEADLINE) + " | " + " | ".join(f"{m} per seed" for m in PAIRED) + " |")
        lines.append("|" + "---|" * (len(HEADLINE) + len(PAIRED) + 1))
        for r in results:
            if r is not ref:
                lines.append(f"| {r['name']} | " + " | ".join(_units(spread_units(r, ref, m)) for m in HEADLINE)
                             + " | " + " | ".join(_paired_cell(r, ref, m) for m in PAIRED) + " |")
    return "\n".join(lines)


def tradeoff_plot(results: list[dict], against: str | None = None, title: str = "") -> Image.Image:
    """Leakage (x) against ID-Sim (y), one point per row with its seed-std bars; the `against` row is drawn as
    cross-hairs, so a row that beats it lies up and to the left of both lines."""
    # matplotlib only with --plot: the table itself prints without it
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    tab20 = colormaps["tab20"]
    colours = [tab20(2 * k) for k in range(10)] + [tab20(2 * k + 1) for k in range(10)]  # strong ones first
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(results):
        x, y = r["leakage"], r["id_sim"]
        xe, ye = r["std"].get("leakage", 0.0), r["std"].get("id_sim", 0.0)
        is_ref = r["name"] == against
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="s" if is_ref else "o", color="black" if is_ref else colours[i % 20],
                    capsize=2, ms=6 if is_ref else 4, label=r["name"])
        if is_ref:
            ax.axhline(y, color="grey", lw=0.6, ls="--")
            ax.axvline(x, color="grey", lw=0.6, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(6))   # leakage spans ~0.02: the default ticks overlap
    ax.set_xlabel("leakage (lower is better)")
    ax.set_ylabel("Hungarian ID-Sim (higher is better)")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or "rows, mean ± seed std", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m multicrafter.eval table A.json B.json ... [--against NAME] [--plot PNG]`."""
    args = build_parser().parse_args(argv)
    results = [r for p in args.results for r in load_results(p)]
    print(table(results, args.against))
    if args.plot:
        save_image_atomic(tradeoff_plot(results, args.against, args.title), args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    run_cli(main)
