"""`python -m multicrafter.eval figures`: the toy ablation's README figures.

- `--sheet PNG`: the same held-out scenes across adapters, assembled from the images `eval toy --save-images` wrote
  (one folder per adapter, nothing is generated again): references | ground truth | one column per adapter.
- `--attention PNG`: one held-out scene with a similar pair, generated with each of `--attention-adapters` (default
  baseline and attn: without and with the Dice loss); each subject's ref2img map over the image, titled with the
  share of that map inside the subject's own region of the ground-truth layout.
- `--attention-stats N`: the same shares averaged over N held-out multi-subject scenes per adapter (a number for
  how well the Dice loss pins each reference's attention to its subject, beside the picture), per captured block too
  (`--single-blocks` adds the single-stream blocks, `--attention-mode img2ref` the other view); `--stats-plot PNG`
  draws those per-block shares as bars.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation
from tqdm.auto import tqdm

from ..attention_overlay import overlay
from ..errors import ArgumentParser, UserError, int_list, run_cli
from ..io import atomic_write_text, save_image_atomic
from ..toyworld import build_sample


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated adapter names like baseline,attn")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The `eval figures` command line."""
    p = ArgumentParser(prog="python -m multicrafter.eval figures",
                       description="README figures of the toy ablation: a contact sheet across adapters and the "
                                   "attention maps with and without the Dice loss.")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder with one subfolder per adapter, each written by `eval toy --save-images`")
    p.add_argument("--adapters", type=_names, default=["baseline", "attn", "attn_moe", "ippo"])
    p.add_argument("--sheet", default=None, metavar="PNG", help="write the contact sheet here")
    p.add_argument("--scenes", type=int, default=8, help="rows of the sheet (held-out scenes 0..N-1)")
    p.add_argument("--seed", type=int, default=0, help="generator seed whose images the sheet shows")
    p.add_argument("--attention", default=None, metavar="PNG", help="write the attention comparison here")
    p.add_argument("--attention-adapters", type=_names, default=["baseline", "attn"],
                   help="adapters (names or folders) for --attention/--attention-stats; none = the base alone")
    p.add_argument("--attention-stats", type=int, default=0, metavar="N",
                   help="also measure, over the first N held-out scenes with several subjects, the mean share of "
                        "each subject's map inside its own region and inside the other subjects' regions")
    p.add_argument("--attention-mode", choices=("ref2img", "img2ref"), default="ref2img",
                   help="which attention map: ref2img (each reference's queries over the image, the paper's) or "
                        "img2ref (each image position's attention mass on each reference)")
    p.add_argument("--single-blocks", action="store_true",
                   help="--attention-stats also captures the single-stream blocks (per-block shares in the JSON)")
    p.add_argument("--attention-heads", type=int_list, default=None, metavar="H,H",
                   help="form the maps from these attention heads only (default: the mean over all heads)")
    p.add_argument("--json", default=None, help="write the --attention-stats numbers here")
    p.add_argument("--stats-plot", default=None, metavar="PNG",
                   help="draw the --attention-stats per-block shares (own region vs other subjects) here")
    p.add_argument("--model", default="toy", help="model for --attention (default toy)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scene-seed", type=int, default=0, help="held-out scene set (as in eval toy)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--ref-size", type=int, default=64)
    p.add_argument("--similar-prob", type=float, default=0.3)
    return p


def _scene(args: argparse.Namespace, i: int) -> Any:
    return build_sample(args.scene_seed, i, split="test", size=args.size, ref_size=args.ref_size,
                        similar_prob=args.similar_prob)


def _label(width: int, text: str, height: int = 14) -> np.ndarray:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(img).text((3, 1), text, fill=(0, 0, 0))
    return np.asarray(img)


def contact_sheet(args: argparse.Namespace) -> Image.Image:
    """Rows: held-out scenes; columns: references, ground truth, each adapter's image for the same seed."""
    root = Path(args.images)
    missing = [a for a in args.adapters if not (root / a).is_dir()]
    if missing:
        raise UserError(f"no image folder for adapter(s) {', '.join(missing)} under {root} "
                        "(run `python -m multicrafter.eval toy ... --save-images DIR/ADAPTER` first)")
    s = args.size
    gap = np.full((s, 4, 3), 255, np.uint8)
    rows = []
    for i in range(args.scenes):
        sample = _scene(args, i)
        refs = np.full((s, s // 2, 3), 255, np.uint8)
        for k, r in enumerate(sample.references[:4]):
            small = np.asarray(Image.fromarray(r).resize((s // 2, s // 4)))[:, :, :3] if len(sample.references) > 2 \
                else np.asarray(Image.fromarray(r).resize((s // 2, s // 2)))[:, :, :3]
            y = k * small.shape[0]
            refs[y:y + small.shape[0]] = small
        cells = [refs, gap, sample.image[:, :, :3]]
        for a in args.adapters:
            path = root / a / f"seed{args.seed}_{i:04d}.png"
            if not path.is_file():
                raise UserError(f"missing {path}: evaluate at least {args.scenes} scenes with seed {args.seed}")
            with Image.open(path) as im:
                cells += [gap, np.asarray(im.convert("RGB").resize((s, s)))]
        row = np.concatenate(cells, axis=1)
        lines = textwrap.wrap(sample.prompt, width=max(20, row.shape[1] // 6))
        text = Image.new("RGB", (row.shape[1], 12 * len(lines) + 4), (255, 255, 255))
        ImageDraw.Draw(text).multiline_text((3, 1), "\n".join(lines), fill=(60, 60, 60), spacing=2)
        rows += [row, np.asarray(text), np.full((6, row.shape[1], 3), 255, np.uint8)]
    header = np.concatenate([_label(s // 2, "refs"), _label(4, ""), _label(s, "ground truth")]
                            + [x for a in args.adapters for x in (_label(4, ""), _label(s, a))], axis=1)
    return Image.fromarray(np.concatenate([header, *rows], axis=0))


def _on_grid(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) boolean mask -> (h, w) area fractions."""
    h, w = shape
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BOX), np.float32) / 255.0


def attention_share(amap: np.ndarray, mask: np.ndarray) -> float:
    """Share of one subject's (h, w) attention map inside its (H, W) layout mask, mask area-averaged to the grid."""
    total = float(amap.sum())
    return float((amap * _on_grid(mask, amap.shape)).sum() / total) if total > 0 else 0.0


def near_share(amap: np.ndarray, mask: np.ndarray, rest: np.ndarray) -> float:
    """Share of the map on the one-token ring just outside the subject (grid cells its mask does not touch but a
    neighbour cell does), minus whatever of that ring other subjects cover: the background next to the subject."""
    own = _on_grid(mask, amap.shape) > 0
    ring = (binary_dilation(own, structure=np.ones((3, 3), bool)) & ~own) * (1.0 - _on_grid(rest, amap.shape))
    total = float(amap.sum())
    return float((amap * ring).sum() / total) if total > 0 else 0.0


def _generate_with_maps(pipe, args: argparse.Namespace, sample: Any, seed: int,
                        ) -> tuple[Image.Image, np.ndarray, dict[int, np.ndarray]]:
    """One held-out scene generated with its references; the image, the (refs, h, w) maps (--attention-mode) and
    each captured block's maps (single-stream block i keyed n_double + i)."""
    singles = range(len(pipe.transformer.single_transformer_blocks)) if args.single_blocks else None
    out = pipe(prompt=sample.prompt, reference_images=[Image.fromarray(r) for r in sample.references],
               height=args.size, width=args.size, num_inference_steps=args.steps, return_attention=True,
               attention_mode=args.attention_mode, attention_single_blocks=singles,
               attention_heads=args.attention_heads,
               generator=torch.Generator().manual_seed(seed))
    per_block = {k: v.float().numpy() for k, v in (out.attention_per_block or {}).items()}
    return out.images[0], out.attention_maps.float().numpy(), per_block


def _use_adapter(pipe, name: str) -> None:
    """Load adapter `name` (a name or folder), or unload any for `none` (the base alone)."""
    if name == "none":
        pipe.unload_adapter()
    else:
        pipe.load_adapter(name)


def attention_comparison(args: argparse.Namespace) -> tuple[Image.Image, dict[str, list[float]]]:
    """The first held-out scene with a similar pair, under each adapter: image + each subject's attention map."""
    # diffusers + transformers take seconds to import: loaded only when a figure needs the model
    from ..pipeline import MultiCrafterPipeline

    sample = next((x for x in (_scene(args, i) for i in range(500))
                   if x.scene["similar"] and len(x.references) == 2), None)
    if sample is None:
        raise UserError("no held-out scene with a similar pair of two subjects in the first 500 (raise --similar-prob)")
    pipe = MultiCrafterPipeline.from_pretrained(args.model, adapter=False)
    rows, shares = [], {}
    for name in args.attention_adapters:
        _use_adapter(pipe, name)
        image, maps, _ = _generate_with_maps(pipe, args, sample, args.seed)
        shares[name] = [attention_share(maps[k], sample.masks[k]) for k in range(len(sample.references))]
        rows.append((name, image, maps))
    n = len(sample.references)
    fig = Figure(figsize=(2.4 * (n + 2), 2.6 * len(rows) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(rows), n + 2))
    names = [s["name"] if isinstance(s, dict) and "name" in s else f"subject {k + 1}"
             for k, s in enumerate(sample.scene.get("subjects", [])[:n])]
    for r, (name, image, maps) in enumerate(rows):
        axes[r, 0].imshow(np.concatenate([np.asarray(Image.fromarray(x).resize((64, 64))) for x in sample.references]))
        axes[r, 0].set_title("references", fontsize=8)
        axes[r, 1].imshow(image)
        axes[r, 1].set_title(name, fontsize=9, fontweight="bold")
        for k in range(n):
            axes[r, k + 2].imshow(overlay(image, maps[k]))
            label = names[k] if k < len(names) else f"subject {k + 1}"
            axes[r, k + 2].set_title(f"{label}\n{100 * shares[name][k]:.0f}% inside its region", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("\n".join(textwrap.wrap(sample.prompt, 90)), fontsize=8)
    fig.tight_layout()
    canvas = fig.canvas
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[:, :, :3].copy()), shares


def _block_name(key: int, n_double: int) -> str:
    return f"double {key}" if key < n_double else f"single {key - n_double}"


def attention_stats(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per adapter: mean share of each subject's map inside its own ground-truth region ("own") and inside the other
    subjects' regions ("other", where leakage starts) and on the background within one token of it ("near"), over
    the first N multi-subject held-out scenes; the same per
    captured block under "blocks" (where in the network each reference is routed to its place)."""
    # diffusers + transformers take seconds to import: loaded only when a figure needs the model
    from ..pipeline import MultiCrafterPipeline

    samples, i = [], 0
    while len(samples) < args.attention_stats and i < 50 * args.attention_stats + 100:
        x = _scene(args, i)
        i += 1
        if len(x.references) >= 2:
            samples.append(x)
    pipe = MultiCrafterPipeline.from_pretrained(args.model, adapter=False)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images below, not one per image
    n_double = len(pipe.transformer.transformer_blocks)
    stats = {}
    with tqdm(total=len(samples) * len(args.attention_adapters), desc="attention stats", unit="img") as bar:
        for name in args.attention_adapters:
            _use_adapter(pipe, name)
            shares: dict[str, dict[str, list[float]]] = {}  # "all" or block name -> own/other shares
            for j, sample in enumerate(samples):
                _, maps, per_block = _generate_with_maps(pipe, args, sample, args.seed + j)
                views = {"all": maps, **{_block_name(b, n_double): m for b, m in sorted(per_block.items())}}
                for k in range(len(sample.references)):
                    rest = np.any([m for q, m in enumerate(sample.masks) if q != k], axis=0)
                    for view, m in views.items():
                        got = shares.setdefault(view, {"own": [], "other": [], "near": []})
                        got["own"].append(attention_share(m[k], sample.masks[k]))
                        got["other"].append(attention_share(m[k], rest))
                        got["near"].append(near_share(m[k], sample.masks[k], rest))
                bar.update(1)
            mean = {view: {key: float(np.mean(v)) for key, v in got.items()} for view, got in shares.items()}
            stats[name] = {**mean.pop("all"), "maps": len(shares["all"]["own"]), "scenes": len(samples),
                           "mode": args.attention_mode, "heads": args.attention_heads, "blocks": mean}
    return stats


def attention_stats_plot(stats: dict[str, dict[str, Any]], title: str = "") -> Image.Image:
    """Per-block bars from `attention_stats`: share of each map inside its own subject (solid) and inside the other
    subjects (hatched), one colour per adapter, blocks in the order they run."""
    names = list(stats)
    blocks = list(next(iter(stats.values()))["blocks"]) if names else []
    if not blocks:
        raise UserError("no per-block attention shares to plot")
    fig = Figure(figsize=(1.1 * len(blocks) + 2.5, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(names)
    x = np.arange(len(blocks))
    for i, name in enumerate(names):
        own = [100 * stats[name]["blocks"][b]["own"] for b in blocks]
        other = [100 * stats[name]["blocks"][b]["other"] for b in blocks]
        pos = x - 0.4 + width * (i + 0.5)
        label = Path(name).parent.name if name.endswith("/adapter") else name
        bars = ax.bar(pos - width / 4, own, width / 2, label=label)
        ax.bar(pos + width / 4, other, width / 2, color="white", edgecolor=bars.patches[0].get_facecolor(),
               hatch="////")
    ax.bar([0], [0], 0, color="white", edgecolor="grey", hatch="////", label="hatched: on the other subjects")
    ax.set_xticks(x, blocks, fontsize=8)
    ax.set_ylabel("% of each subject's map")
    ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.set_title(title or f"{stats[names[0]].get('mode', '')} attention per block", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m multicrafter.eval figures ...`: the README's contact sheet and attention figure."""
    args = build_parser().parse_args(argv)
    if not args.sheet and not args.attention and not args.attention_stats:
        raise UserError("nothing to do: give --sheet PNG, --attention PNG and/or --attention-stats N")
    if args.attention_stats < 0:
        raise UserError(f"--attention-stats must be >= 0, got {args.attention_stats}")
    if args.sheet:
        if not args.images:
            raise UserError("--sheet needs --images DIR (the folders eval toy --save-images wrote)")
        if args.scenes < 1:
            raise UserError(f"--scenes must be >= 1, got {args.scenes}")
        save_image_atomic(contact_sheet(args), args.sheet)
        print(f"wrote {args.sheet}")
    if args.attention:
        image, shares = attention_comparison(args)
        save_image_atomic(image, args.attention)
        for name, values in shares.items():
            print(f"{name}: attention inside own region " + ", ".join(f"{100 * v:.0f}%" for v in values))
        print(f"wrote {args.attention}")
    if args.attention_stats:
        stats = attention_stats(args)
        print(f"{args.attention_mode} attention over {args.attention_stats} held-out multi-subject scenes "
              "(share of each subject's map inside its own region / inside the other subjects' regions / on the "
              "background within one token of it):")
        print("| adapter | block | own region | other subjects' regions | background next to it |\n|---|---|---|---|---|")
        for name, v in stats.items():
            for block, b in [("all captured", v), *v["blocks"].items()]:
                print(f"| {name} | {block} | {100 * b['own']:.1f}% | {100 * b['other']:.1f}% | {100 * b['near']:.1f}% |")
        if args.json:
            atomic_write_text(args.json, json.dumps(stats, indent=2) + "\n")
        if args.stats_plot:
            save_image_atomic(attention_stats_plot(stats), args.stats_plot)
            print(f"wrote {args.stats_plot}")
    return 0


if __name__ == "__main__":
    run_cli(main)
