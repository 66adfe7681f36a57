"""IPPO cost of the MixGRPO window: training-phase time per rollout with w of T steps vs training on all T steps,
and rollout network evaluations per image.

    python bench/ippo_step.py [--model tiny|toy|DIR] [--steps 16] [--window 2] [--size 64] [--group-size 4]
                              [--repeats 5] [--device cpu] [--dtype fp32] [--layers 2 --single-layers 4 --heads 4]

Same model, one run: two rollouts (window [0, w) and window = all T steps) from the same trained-adapter state, then
`train.ippo.policy_update` (the trainer's own update: recompute window log-probs, GSPO loss, backward, clip, AdamW
step) timed on each, interleaved, medians of `--repeats`. The adapter is restored after every call, so each repeat
does the same work. Network evaluations per image are counted with a forward hook on the transformer during the
rollout (target: exactly T, no extra passes). With `--model tiny` the random transformer is rebuilt at the given
depth/width (FLUX architecture) so the step is dominated by the network, as it is for FLUX.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from diffusers import FluxTransformer2DModel  # noqa: E402

from bench.measure import interleaved_medians  # noqa: E402
from multicrafter import MultiCrafterPipeline  # noqa: E402
from multicrafter.presets import TINY_TRANSFORMER, build_tiny_components  # noqa: E402
from multicrafter.rollout import GroupInput, RolloutOptions, encode_group, iter_chunks, rollout, window_log_probs  # noqa: E402
from train.ippo import GSPOConfig, ModelConfig, policy_update, setup_adapter  # noqa: E402
from train.optim import OptimConfig, build_optimizer  # noqa: E402
from train.run_setup import build_model, parse_dtype  # noqa: E402


def build_pipe(args):
    """The model to time: a named/folder model, or the tiny one rebuilt at the requested depth and width."""
    dtype = parse_dtype(args.dtype)
    if args.model != "tiny":
        return build_model(args.model, dtype, device=args.device)
    comps = build_tiny_components(dtype=dtype)
    head = args.head_dim
    third = (head // 3) // 2 * 2
    cfg = dict(TINY_TRANSFORMER, num_layers=args.layers, num_single_layers=args.single_layers,
               num_attention_heads=args.heads, attention_head_dim=head,
               axes_dims_rope=(head - 2 * third, third, third))
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**cfg)
    comps["transformer"] = (model if dtype == torch.float32 else model.to(dtype)).eval().requires_grad_(False)
    return MultiCrafterPipeline(**comps).to(args.device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--single-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = build_pipe(args)
    params = setup_adapter(pipe, ModelConfig(lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank)))
    with torch.no_grad():
        for prm in params:  # a trained-looking adapter (B != 0), so the LoRA path costs what it costs in training
            prm.normal_(0, 0.02)
    opts = RolloutOptions(num_steps=args.steps, height=args.size, width=args.size, group_size=args.group_size,
                          max_sequence_length=32, noise_level=0.7)
    ctx = encode_group(pipe, GroupInput("a red-blue striped star on the left, on a plain white background"), opts)

    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    ro_w = rollout(pipe, [ctx], range(args.window), opts, generator=torch.Generator().manual_seed(0))
    nfe_window = sum(calls) / ro_w.num_images
    calls.clear()
    ro_all = rollout(pipe, [ctx], range(args.steps), opts, generator=torch.Generator().manual_seed(0))
    nfe_all = sum(calls) / ro_all.num_images
    hook.remove()

    opt, sched = build_optimizer(params, OptimConfig(lr=1e-4), 10**6)
    saved = [prm.detach().clone() for prm in params]
    adv = torch.tensor([1.0, -1.0] * (args.group_size // 2) + [0.0] * (args.group_size % 2))
    gcfg = GSPOConfig(inner_updates=1)

    def update(ro):
        def run():
            policy_update(pipe.transformer, ro, adv, gcfg, opt, sched, params, 1.0)
            with torch.no_grad():
                for prm, s in zip(params, saved):
                    prm.copy_(s)
        return run

    def roll(window):
        return lambda: rollout(pipe, [ctx], window, opts, generator=torch.Generator().manual_seed(1))

    times = interleaved_medians({f"train_w{args.window}": update(ro_w), f"train_all{args.steps}": update(ro_all),
                                 f"rollout_w{args.window}": roll(range(args.window)),
                                 f"rollout_all{args.steps}": roll(range(args.steps))}, args.repeats)
    res = {
        "device": str(pipe._execution_device) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available()
                                                 else ""),
        "model": args.model, "dtype": args.dtype, "size": args.size, "T": args.steps, "w": args.window,
        "group_size": args.group_size,
        "transformer_params_M": round(sum(x.numel() for x in pipe.transformer.parameters()) / 1e6, 2),
        "train_seconds_window": times[f"train_w{args.window}"], "train_seconds_all": times[f"train_all{args.steps}"],
        "train_ratio": times[f"train_w{args.window}"] / times[f"train_all{args.steps}"],
        "rollout_seconds_window": times[f"rollout_w{args.window}"],
        "rollout_seconds_all_sde": times[f"rollout_all{args.steps}"],
        "nfe_per_image_window": nfe_window, "nfe_per_image_all_sde": nfe_all,
        "first_ratio_exact": bool(_first_ratio_is_one(pipe, ro_w)),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _first_ratio_is_one(pipe, ro) -> bool:
    """The on-device check of the exactness claim: recomputed window log-probs equal the rollout's bit for bit."""
    return all(torch.equal(window_log_probs(pipe.transformer, ro, g, sl).detach(), ro.log_probs[sl])
               for g, sl in iter_chunks(ro))


if __name__ == "__main__":
    raise SystemExit(main())
