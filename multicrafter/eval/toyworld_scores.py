"""`python -m multicrafter.eval toy`: score a model (or the ground-truth renders) on held-out ToyWorld scenes.

The same n scenes (test identity split, `--scene-seed`) are generated once per seed in `--seeds`, so the spread
across seeds is the seed-to-seed spread the ablation targets compare against, and each scene's seeds run as one
batch (image of seed s for scene i: generator seed s * 100003 + i). The JSON holds each metric's mean over seeds,
its per-seed values and std, per-attribute accuracy and the scores restricted to scenes with a similar pair (where
leakage shows). `reward` is IPPO's composite reward on the same images (`--reward-weights`, by default those of
train/configs/toy_ippo.yaml): what post-training maximises, scored on held-out scenes with the deterministic sampler.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ArgumentParser, UserError, int_list, one_line, run_cli
from ..io import atomic_write_json, save_image_atomic
from ..rewards.toyworld_reward import COMPONENT_METRICS
from ..toyworld import build_sample, evaluate_image
from ..toyworld.evaluate import DECOY_KEYS, METRICS  # one definition: the evaluator decides which metrics exist
from ..toyworld.prompts import PROMPT_STYLES, make_prompt
from ..toyworld.scenes import subject_counts

# IPPO's reward weights on the toy (train/configs/toy_ippo.yaml `reward.weights`; a test keeps the two equal).
TOY_REWARD_WEIGHTS = {"text": 1.0, "aes": 0.5, "id": 1.0}


def reward_weights(text: str) -> dict[str, float]:
    """`text=1,aes=0.5,id=1` -> weights of IPPO's reward components (argparse type)."""
    weights: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in COMPONENT_METRICS:
            raise argparse.ArgumentTypeError(f"expected COMPONENT=WEIGHT with COMPONENT in "
                                             f"{', '.join(COMPONENT_METRICS)}, got {part!r}")
        try:
            weights[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {key.strip()} is not a number: {value!r}") from None
    if not weights or not any(weights.values()):
        raise argparse.ArgumentTypeError("give at least one non-zero weight, e.g. text=1,aes=0.5,id=1")
    return weights


def build_parser() -> argparse.ArgumentParser:
    """The `eval toy` command line."""
    p = ArgumentParser(prog="python -m multicrafter.eval toy",
                                description="Score a model on held-out ToyWorld scenes (ID-Sim, leakage, layout, "
                                            "quality, overall). --model ground-truth scores the renders themselves.")
    p.add_argument("--model", required=True, help="toy | ground-truth | tiny | a model folder or hub id")
    p.add_argument("--adapter", default=None, help="adapter name (e.g. baseline, attn, attn_moe, ippo) or folder")
    p.add_argument("--no-adapter", action="store_true",
                   help="the base alone (without it, `toy` loads its folder's default adapter, manifest.json "
                        "default_adapter: ippo for the shipped toy)")
    p.add_argument("--n", type=int, default=64, help="held-out scenes (prompts), each generated once per seed")
    p.add_argument("--seed", type=int, default=0, help="generator seed (ignored with --seeds)")
    p.add_argument("--seeds", type=int_list, default=None, help="several generator seeds, e.g. 0,1,2")
    p.add_argument("--scene-seed", type=int, default=0, help="which held-out scene set (default 0)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="identities the scenes are drawn from: test (held out, the ablation's protocol) or train "
                        "(with --scene-seed 0 --subjects 1,2,3 the toy's own 4000 training scenes: a memorisation "
                        "check)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the model's own, e.g. 1.0 for toy; else 3.5)")
    p.add_argument("--true-cfg", type=float, default=None,
                   help="true classifier-free guidance scale against the empty prompt (default: the model's own, "
                        "e.g. 3.0 for toy; 1 = off, one transformer call per step)")
    p.add_argument("--size", type=int, default=128, help="scene size (multiple of 16)")
    p.add_argument("--ref-size", type=int, default=64)
    p.add_argument("--similar-prob", type=float, default=0.3,
                   help="probability that a multi-subject scene contains a similar pair (1: every one does)")
    p.add_argument("--subjects", type=subject_counts, default=(2, 3),
                   help="subject counts the held-out scenes are drawn from (default 2,3; e.g. 3 for the scenes "
                        "where leakage is highest)")
    p.add_argument("--prompts", choices=PROMPT_STYLES, default="full",
                   help="what the prompts state of each subject: full (the training captions), no-shape (no shape "
                        "word), positions ('an object on the left': every attribute must come from the references)")
    p.add_argument("--no-shape-words", dest="prompts", action="store_const", const="no-shape",
                   help="the same as --prompts no-shape")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--reward-weights", type=reward_weights, default=dict(TOY_REWARD_WEIGHTS),
                   help="weights of IPPO's composite reward, reported as `reward` (default text=1,aes=0.5,id=1, "
                        "as train/configs/toy_ippo.yaml; text = layout, aes = quality, id = ID-Sim)")
    p.add_argument("--quantize", default="none",
                   help="none | int8 | fp8 | nf4: quantise the transformer and T5 (multicrafter.memory; the CPU runs "
                        "none, int8 and fp8)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--save-images", default=None, metavar="DIR", help="also save each scored image")
    return p


def resolve_device(name: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; anything else must be a device torch can use here."""
    import torch  # only a model run needs torch: ground-truth scoring starts without it

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a torch device (try auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU on this machine (use --device cpu)")
    return name


def _model_runner(model: str, adapter: str | bool | None, steps: int, guidance: float | None,
                  true_cfg: float | None = None, prompt_style: str = "full", device: str = "cpu",
                  quantize: str = "none") -> tuple[Callable[[Any, list[int]], list[Image.Image]], dict]:
    """Load the pipeline once; returns (generate(sample, generator_seeds) -> one image per seed, sampling used).
    Generators stay on the CPU whatever `device` is, so a seed draws the same initial noise everywhere."""
    try:
        # torch, diffusers and transformers only for a model run: ground-truth scoring starts without them
        import torch

        from ..pipeline import MultiCrafterPipeline
        from ..presets import true_cfg_arguments
    except ImportError as exc:
        raise UserError(f"cannot run model {model!r}: the MultiCrafter pipeline is unavailable ({one_line(exc)})") from None
    try:
        pipe = MultiCrafterPipeline.from_pretrained(model, adapter=adapter, device=device, quantize=quantize)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's model/adapter choice
        raise UserError(f"cannot load model {model!r}" + (f" with adapter {adapter!r}" if adapter else "")
                        + f": {one_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead (see main)
    if guidance is None:
        guidance = pipe.sampling_defaults.get("guidance_scale", 3.5)
    if true_cfg is None:
        true_cfg = float(pipe.sampling_defaults.get("true_cfg_scale", 1.0))
    cfg = true_cfg_arguments(true_cfg, negative_prompt=pipe.sampling_defaults.get("negative_prompt", ""))

    def generate(sample: Any, seeds: list[int]) -> list[Image.Image]:
        h, w = sample.image.shape[:2]
        prompt = sample.prompt if prompt_style == "full" else make_prompt(sample.scene, prompt_style)
        out = pipe(prompt=prompt, reference_images=[Image.fromarray(r) for r in sample.references],
                   height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                   num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                   **cfg)
        return list(out.images)

    return generate, {"steps": steps, "guidance": guidance, "true_cfg": true_cfg, "device": device,
                      "quantize": quantize}


def _aggregate(per: list[dict]) -> dict:
    out = {m: float(np.mean([r[m] for r in per])) if per else 0.0 for m in METRICS}
    sim = [r for r in per if r["similar"]]
    out["similar_pairs"] = {"n": len(sim), "id_sim": float(np.mean([r["id_sim"] for r in sim])) if sim else None,
                            "leakage": float(np.mean([r["leakage"] for r in sim])) if sim else None}
    out["by_subjects"] = {}  # 1, 2, 3 subjects: where the Dice loss should help is where there is more than one
    for k in sorted({r["n_subjects"] for r in per}):
        group = [r for r in per if r["n_subjects"] == k]
        out["by_subjects"][str(k)] = {"n": len(group), **{m: float(np.mean([r[m] for r in group]))
                                                           for m in ("id_sim", "leakage", "overall")}}
    for key in DECOY_KEYS:  # the decoy control: the leakage metric's chance level
        vals = [r[key] for r in per if r.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    out["notes"] = sorted({note for r in per for note in r["notes"]})[:20]
    return out


def evaluate_scenes(n: int, seeds: list[int], generate: Callable[[Any, list[int]], list] | None,
                    scene_seed: int = 0, size: int = 128, ref_size: int = 64, similar_prob: float = 0.3,
                    save_dir: Path | None = None, progress: Any = None,
                    subjects: tuple[int, ...] = (2, 3), split: str = "test") -> dict[int, dict]:
    """Score n scenes of `split`'s identities (held out by default; each with one of `subjects` subjects) once per
    seed; `generate=None` scores the ground-truth renders. Returns per-seed aggregates."""
    per: dict[int, list[dict]] = {s: [] for s in seeds}
    for i in range(n):
        sample = build_sample(scene_seed, i, split=split, size=size, ref_size=ref_size, similar_prob=similar_prob,
                              n_subjects=subjects)
        refs = [Image.fromarray(r) for r in sample.references]
        if generate is None:  # the render is the same for every seed: score it once
            result = evaluate_image(sample.image, refs, scene=sample.scene, decoys=True)
            images, results = [sample.image] * len(seeds), [result] * len(seeds)
        else:
            images = generate(sample, [s * 100003 + i for s in seeds])
            results = [evaluate_image(im, refs, scene=sample.scene, decoys=True) for im in images]
        for s, image, result in zip(seeds, images, results):
            if save_dir is not None:
                pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
                save_image_atomic(pil, save_dir / f"seed{s}_{i:04d}.png")
            per[s].append(dict(result, similar=sample.scene["similar"], n_subjects=len(sample.references)))
        if progress is not None:
            progress.update(len(seeds))
    return {s: _aggregate(per[s]) for s in seeds}


def _pooled(groups: list[dict], metrics: Sequence[str]) -> dict:
    """Per-seed group means -> one mean over all their scenes (weighted by each group's n; None when empty)."""
    groups = [g for g in groups if g["n"]]
    total = sum(g["n"] for g in groups)
    return {"n": total, **{m: sum(g[m] * g["n"] for g in groups) / total if total else None for m in metrics}}


def summarise(per_seed: dict[int, dict], n: int, weights: dict[str, float] | None = None) -> dict:
    """Mean, per-seed values and std of every metric; with `weights`, also IPPO's composite `reward`."""
    seeds = list(per_seed)
    res: dict[str, Any] = {"n": n * len(seeds), "n_scenes": n, "seeds": seeds, "per_seed": {}, "std": {}}
    if weights:  # a weighted sum of per-seed means is the per-seed mean of the per-image reward
        per_seed = {s: dict(agg, reward=sum(w * agg[COMPONENT_METRICS[k]] for k, w in weights.items()))
                    for s, agg in per_seed.items()}
        res["reward_weights"] = dict(weights)
    for m in METRICS + (("reward",) if weights else ()):
        vals = [per_seed[s][m] for s in seeds]
        res[m] = float(np.mean(vals))
        res["per_seed"][m] = vals
        res["std"][m] = float(np.std(vals)) if len(vals) > 1 else 0.0
    res["attribute_accuracy"] = {a: res[f"acc_{a}"] for a in ("shape", "colour", "pattern")}
    for key in DECOY_KEYS:
        vals = [per_seed[s].get(key) for s in seeds]
        if all(v is not None for v in vals):
            res[key] = float(np.mean(vals))
            res["per_seed"][key] = vals
            res["std"][key] = float(np.std(vals)) if len(vals) > 1 else 0.0
    res["similar_pairs"] = _pooled([per_seed[s]["similar_pairs"] for s in seeds], ("id_sim", "leakage"))
    res["by_subjects"] = {k: _pooled([per_seed[s]["by_subjects"].get(k, {"n": 0}) for s in seeds],
                                     ("id_sim", "leakage", "overall"))
                          for k in sorted({k for s in seeds for k in per_seed[s]["by_subjects"]})}
    res["notes"] = sorted({note for s in seeds for note in per_seed[s]["notes"]})[:20]
    return res


def markdown_table(res: dict) -> str:
    """One result as a Markdown table: each metric's mean, std and per-seed values."""
    seeds = res["seeds"]
    head = "| metric | mean | std | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    sep = "|---" * (3 + len(seeds)) + "|"
    rows = [head, sep]
    for m in METRICS:
        rows.append(f"| {m} | {res[m]:.3f} | {res['std'][m]:.3f} | "
                    + " | ".join(f"{v:.3f}" for v in res["per_seed"][m]) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m multicrafter.eval toy --model toy|ground-truth|DIR ... --json out.json`."""
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.size < 32 or args.size % 16:
        raise UserError(f"--size must be a multiple of 16 and >= 32, got {args.size}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 <= args.similar_prob <= 1.0:
        raise UserError(f"--similar-prob must be in [0, 1], got {args.similar_prob}")
    if args.true_cfg is not None:
        from ..presets import true_cfg_arguments  # imports torch: only when the option is given

        true_cfg_arguments(args.true_cfg)  # checked before anything loads
    seeds = args.seeds if args.seeds is not None else [args.seed]
    ground_truth = args.model in ("ground-truth", "gt")
    if ground_truth and (args.adapter or args.no_adapter):
        raise UserError("--adapter/--no-adapter make no sense with --model ground-truth")
    if args.adapter and args.no_adapter:
        raise UserError("give --adapter NAME or --no-adapter, not both")
    adapter = False if args.no_adapter else args.adapter  # False: not even toy's shipped default
    if ground_truth and args.prompts != "full":
        raise UserError(f"--prompts {args.prompts} changes the prompts a model sees; ground truth sees none")
    device = None if ground_truth else resolve_device(args.device)
    generate, used = (None, {"steps": None, "guidance": None, "true_cfg": None, "device": None}) if ground_truth \
        else _model_runner(args.model, adapter, args.steps, args.guidance, args.true_cfg,
                           prompt_style=args.prompts, device=device, quantize=args.quantize)
    save_dir = Path(args.save_images) if args.save_images else None
    with tqdm(total=args.n * len(seeds), desc="eval toy", unit="img", disable=ground_truth) as bar:
        per_seed = evaluate_scenes(args.n, seeds, generate, args.scene_seed, args.size, args.ref_size,
                                   args.similar_prob, save_dir, bar, args.subjects, args.split)
    res = summarise(per_seed, args.n, args.reward_weights)
    res.update({"model": args.model, "adapter": "none" if args.no_adapter else args.adapter, "split": args.split,
                "scene_seed": args.scene_seed, "subjects": list(args.subjects), "similar_prob": args.similar_prob,
                "size": args.size, "prompts": args.prompts, **used})
    if any(isinstance(v, float) and not math.isfinite(v) for v in res.values()):
        raise UserError("evaluation produced a non-finite score")
    kind = "held-out" if args.split == "test" else "training-identity"
    print(f"ToyWorld {kind} scenes: model={args.model}" + (f" adapter={args.adapter}" if args.adapter else "")
          + f", {args.n} scenes x {len(seeds)} seed(s)" + (f", guidance {used['guidance']}" if used["guidance"] is not None else "")
          + (f", true CFG {used['true_cfg']:g}" if (used["true_cfg"] or 1.0) > 1 else "")
          + (f", prompts: {args.prompts}" if args.prompts != "full" else "")
          + (f", on {used['device']}" if used["device"] not in (None, "cpu") else ""))
    print(markdown_table(res))
    print(f"IPPO's composite reward ({', '.join(f'{k} {w:g}' for k, w in args.reward_weights.items())}): "
          f"{res['reward']:.3f} ± {res['std']['reward']:.3f}")
    if "leakage_decoy" in res and "leakage_real" in res:
        print(f"decoy control (canonical renders): leakage against the other subjects {res['leakage_real']:.3f}, "
              f"against decoys (chance) {res['leakage_decoy']:.3f}; bleeding above chance "
              f"{res['leakage_real'] - res['leakage_decoy']:+.3f} (per seed "
              + " / ".join(f"{a - b:+.3f}" for a, b in zip(res["per_seed"]["leakage_real"],
                                                            res["per_seed"]["leakage_decoy"])) + ")")
    sp = res["similar_pairs"]
    if sp["n"]:
        print(f"similar-pair scenes ({sp['n']}): id_sim {sp['id_sim']:.3f}, leakage {sp['leakage']:.3f}")
    print("by subjects: " + "; ".join(f"{k}: id_sim {g['id_sim']:.3f}, leakage {g['leakage']:.3f} (n {g['n']})"
                                      for k, g in res["by_subjects"].items()))
    if args.json:
        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    run_cli(main)
