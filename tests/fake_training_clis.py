"""Stand-ins for the training and evaluation commands that the GPU recipes (train/toy_gpu.sh, train/toy_gpu_rows.sh)
run, so that their tests exercise the scripts' budgeting and packing in seconds.

`install(tmp)` puts a `python` on PATH that sends `python -m train.pretrain | train.ippo | train.assemble_toy |
multicrafter.eval` here and everything else to the real interpreter. Each stand-in appends its module, argv and the
environment it saw to $FAKE_CLI_LOG, then writes the files that the real command writes and the scripts pack:

- train.pretrain: OUTPUT/metrics.jsonl (`sec_per_step` = $FAKE_SEC_PER_STEP), OUTPUT/checkpoint-N/{state.pt,
  meta.json} every output.checkpoint_every steps and at a --max-steps stop (keep_last of them), and at the end
  OUTPUT/pipeline/{transformer,text_encoder,text_encoder_2}/ + OUTPUT/samples/ (base mode) or OUTPUT/adapter/ (adapter
  mode, with $FAKE_ADAPTER_BYTES of weights); `--resume` continues from the newest checkpoint;
- train.ippo: the same checkpoints (train.save_every), then OUTPUT/adapter/; a run whose train.max_steps is out of
  reach (OUT_OF_REACH steps or more) keeps stepping, 20 steps a second, until it is killed, like a run that the
  budget cuts off (train.pretrain likewise);
- train.assemble_toy: --base's transformer and text encoders copied into --out, each --adapter NAME=DIR into
  --out/adapters/NAME;
- multicrafter.eval toy: --json {"model", "adapter", "prompts", "n"}.

Where the real commands write these files is pinned by their own tests (test_pretrain, test_ippo_train,
test_toyworld_eval); `check_with_real_parsers` runs each logged command line through the real command's argument
parser and config loading, so a flag or a config key that a script passes and a command does not accept fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

FAKED = ("train.pretrain", "train.ippo", "train.assemble_toy", "multicrafter.eval")
OUT_OF_REACH = 10_000  # a horizon of this many steps or more is stepped at 20 steps a second, until killed


def install(tmp: Path) -> dict[str, str]:
    """A bin folder with the dispatching `python` and a log file under `tmp`; returns the environment to add."""
    shim = tmp / "fake_bin"
    shim.mkdir(parents=True, exist_ok=True)
    modules = "|".join(f'"-m {m}"' for m in FAKED)
    (shim / "python").write_text(
        "#!/bin/sh\n"
        f'case "$1 $2" in {modules}) exec "{sys.executable}" "{Path(__file__).resolve()}" "$@";; esac\n'
        # the scripts' first line reports the torch build; the stand-ins need none
        'case "$1 $2" in "-c import torch"*) echo "torch (stand-in) cuda False"; exit 0;; esac\n'
        f'exec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    return {"PATH": f"{shim}:{os.environ['PATH']}", "FAKE_CLI_LOG": str(tmp / "fake_cli.jsonl")}


def calls(tmp: Path) -> list[dict[str, Any]]:
    """The logged command lines, in the order they started."""
    path = tmp / "fake_cli.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_with_real_parsers(records: list[dict[str, Any]]) -> list[Any]:
    """Parse each logged command line with the real command (argparse + config loading); returns one parsed object
    per record: the loaded config for training, the argparse namespace otherwise."""
    from unittest import mock

    import train.assemble_toy
    import train.ippo
    import train.pretrain
    from multicrafter.eval import toyworld_scores

    out: list[Any] = []
    for rec in records:
        module, argv = rec["module"], rec["argv"]
        if module in ("train.pretrain", "train.ippo"):
            mod = train.pretrain if module == "train.pretrain" else train.ippo
            cls = train.pretrain.PretrainConfig if module == "train.pretrain" else train.ippo.IPPOConfig
            args = mod.build_parser().parse_args(argv)  # as main() does before it trains
            out.append(mod.load_config(args.config, cls, mod.parse_set_overrides(args.set)))
        elif module == "train.assemble_toy":
            seen: list[tuple] = []

            def record(out_dir, *a, _seen=seen):
                _seen.append((out_dir, *a))
                return Path(out_dir)

            with mock.patch.object(train.assemble_toy, "assemble", record):
                train.assemble_toy.main(argv)
            out.append(seen[0])
        else:
            assert argv[0] == "toy", argv
            out.append(toyworld_scores.build_parser().parse_args(argv[1:]))
    return out


# ---- the stand-ins (run as a script: stdlib and yaml only, so each starts in milliseconds) ----

def _opts(argv: list[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """--flag VALUE / --flag pairs (the last one wins) and the --set and --adapter lists, in order."""
    opts: dict[str, Any] = {}
    sets: list[str] = []
    adapters: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if a == "--set":
            sets.append(argv[i + 1])
        elif a == "--adapter" and takes_value:
            adapters.append(argv[i + 1])
        elif takes_value:
            opts[a] = argv[i + 1]
        else:
            opts[a] = True
        i += 2 if takes_value or a == "--set" else 1
    return opts, sets, adapters


def _config(path: str, sets: list[str]) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    for item in sets:
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def _write_atomic_checkpoint(out: Path, step: int, keep_last: int) -> None:
    tmp = out / f"checkpoint-{step}.tmp-fake"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "state.pt").write_bytes(b"state %d" % step)
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    final = out / f"checkpoint-{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    done = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
                  key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep_last]:
        shutil.rmtree(old)


def _last_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def _train(out: Path, resume: bool, max_steps: int, stop_at: int | None, every: int, keep_last: int) -> int:
    """Step from the newest checkpoint (with --resume) to stop_at or max_steps, logging and checkpointing."""
    out.mkdir(parents=True, exist_ok=True)
    step = _last_step(out) if resume else 0
    end = min(max_steps, stop_at) if stop_at else max_steps
    sec = float(os.environ.get("FAKE_SEC_PER_STEP", "0.5"))
    with open(out / "metrics.jsonl", "a") as log:
        while step < end:
            step += 1
            log.write(json.dumps({"step": step, "loss": 1.0 / step, "sec_per_step": sec}) + "\n")
            log.flush()
            if step % every == 0 or step == end:
                _write_atomic_checkpoint(out, step, keep_last)
            if end >= OUT_OF_REACH:  # a run the budget must cut: step at a pace its watch loop can follow
                time.sleep(0.05)
    return step


def _adapter(out: Path, rank: Any) -> None:
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"lora_rank": rank}))
    (out / "adapter" / "adapter_model.safetensors").write_bytes(
        os.urandom(int(os.environ.get("FAKE_ADAPTER_BYTES", "1024"))))


def _pretrain(argv: list[str]) -> None:
    opts, sets, _ = _opts(argv)
    cfg = _config(opts["--config"], sets)
    out = Path(opts["--output-dir"])
    stop_at = int(opts["--max-steps"]) if "--max-steps" in opts else None
    o = cfg["output"]
    step = _train(out, "--resume" in opts, int(cfg["train"]["max_steps"]), stop_at, int(o["checkpoint_every"]),
                  int(o.get("keep_last", 2)))
    if cfg["train"]["mode"] == "adapter":
        _adapter(out, cfg["adapter"].get("lora_rank"))
        what = "adapter"
    else:
        for part, name in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                           ("text_encoder_2", "model.safetensors")):
            (out / "pipeline" / part).mkdir(parents=True, exist_ok=True)
            (out / "pipeline" / part / name).write_bytes(b"weights")
        (out / "samples" / f"step-{step:06d}").mkdir(parents=True, exist_ok=True)
        what = "pipeline"
    print(f"done: step {step}; {what} saved under {out / what}")


def _ippo(argv: list[str]) -> None:
    opts, sets, _ = _opts(argv)
    cfg = _config(opts["--config"], sets)
    out = Path(opts["--output-dir"])
    t = cfg["train"]
    _train(out, "--resume" in opts, int(t["max_steps"]), None, int(t["save_every"]), int(t.get("keep_last", 2)))
    _adapter(out, "ippo")
    print(f"adapter: {out / 'adapter'}")


def _assemble(argv: list[str]) -> None:
    opts, _, adapters = _opts(argv)
    out = Path(opts["--out"])
    if "--base" in opts:
        for part in ("transformer", "text_encoder", "text_encoder_2"):
            shutil.copytree(Path(opts["--base"]) / part, out / part, dirs_exist_ok=True)
    for item in adapters:
        name, _, src = item.partition("=")
        shutil.copytree(src, out / "adapters" / name, dirs_exist_ok=True)
    print(f"assembled {out}")


def _eval(argv: list[str]) -> None:
    opts, _, adapters = _opts(argv[1:])
    res = {"model": opts["--model"], "adapter": "none" if "--no-adapter" in opts else adapters[0],
           "prompts": opts["--prompts"], "n": int(opts["--n"])}
    Path(opts["--json"]).write_text(json.dumps(res))


def _main() -> None:
    module, argv = sys.argv[2], sys.argv[3:]
    keep = ("MULTICRAFTER_TOY_DIR", "OMP_NUM_THREADS")
    line = json.dumps({"module": module, "argv": argv, "env": {k: os.environ[k] for k in keep if k in os.environ}})
    with open(os.environ["FAKE_CLI_LOG"], "a") as f:
        f.write(line + "\n")  # one write per line: concurrent rows do not interleave
    {"train.pretrain": _pretrain, "train.ippo": _ippo, "train.assemble_toy": _assemble,
     "multicrafter.eval": _eval}[module](argv)


if __name__ == "__main__":
    _main()
