"""train/toy_gpu_rows.sh, the GPU pass that trains several rows at once and scores them: it must end inside its
budget and leave every row, evaluation and IPPO checkpoint packed (here on CPU, with every stage shrunk)."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _unsplit(pack: Path, name: str, tmp: Path) -> Path:
    """The tar NAME as packed: whole, or its parts NAME.00, NAME.01, ... put back together."""
    if (pack / name).exists():
        return pack / name
    out = tmp / name
    out.write_bytes(b"".join(p.read_bytes() for p in sorted(pack.glob(f"{name}.[0-9][0-9]"))))
    return out


def test_rows_script_trains_scores_and_packs_in_budget(tmp_path):
    runs, pack, shim = tmp_path / "runs", tmp_path / "pack", tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the script calls `python`
    (shim / "python").chmod(0o755)
    common = (f"--set data.toyworld.n=8 --set data.toyworld.folder={runs}/tw --set data.cache_dir={runs}/cache "
              "--set data.num_validation=1 --set output.validation_steps=2 --set data.batch_size=2 "
              "--set train.max_steps=2 --set output.checkpoint_every=1 --set data.positions_caption_prob=0.5")
    budget = 300  # an upper bound: every stage here ends by itself, so a loaded machine only makes it slower
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "RUNS": str(runs), "PACK": str(pack),
           "BUDGET": str(budget), "EVAL_RESERVE": "150", "SPLIT_MB": "1", "COMMON_SET": common, "EVAL_BASE": "1",
           "ROWS": "plain toy_adapter_baseline\n\nr8 toy_adapter_attn --set adapter.lora_rank=8 "
                   "--set attention_loss.mode=img2ref\n",
           "EVAL_ARGS": "--n 1 --seeds 0 --steps 2 --true-cfg 1 --prompts positions --device cpu",
           "IPPO_FROM": "r8",
           # IPPO runs to its end here (being cut off at the budget is tested on train/toy_gpu.sh)
           "IPPO_SET": (f"--set prompts.toyworld.n=2 --set prompts.toyworld.folder={runs}/twi "
                        "--set sampling.num_steps=2 --set sampling.group_size=2 --set window.size=1 "
                        "--set train.max_steps=2 --set train.groups_per_step=1 --set train.save_every=1 "
                        "--set train.sample_every=0")}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "train/toy_gpu_rows.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=budget + 120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < budget + 15, f"the script ran {elapsed:.0f} s on a {budget} s budget"
    names = sorted(p.name for p in pack.iterdir())
    whole = {n.split(".tar")[0] + ".tar" for n in names}
    assert whole == {"evals.tar", "ippo.tar", "ippo_checkpoint.tar", "rows.tar"}, names + [proc.stdout[-2000:]]
    parts = [n for n in names if n.startswith("rows.tar.")]  # rows.tar is over SPLIT_MB: cut in parts
    assert len(parts) >= 2 and parts == [f"rows.tar.{k:02d}" for k in range(len(parts))], names
    assert all((pack / n).stat().st_size <= 2**20 for n in names)
    rows = _unsplit(pack, "rows.tar", tmp_path)
    with tarfile.open(rows) as t:
        got = t.getnames()
    for row in ("plain", "r8"):
        assert f"{row}/adapter/adapter_config.json" in got and f"{row}/metrics.jsonl" in got and f"{row}.log" in got
    with tarfile.open(pack / "evals.tar") as t:
        t.extractall(tmp_path / "evals", filter="data")
    for row in ("plain", "r8"):
        res = json.loads((tmp_path / "evals" / "evals" / f"eval_{row}.json").read_text())
        assert res["adapter"] == str(runs / row / "adapter") and res["prompts"] == "positions" and res["n"] == 1
    assert json.loads((tmp_path / "evals" / "evals" / "eval_base.json").read_text())["adapter"] == "none"
    config = json.loads((runs / "r8" / "adapter" / "adapter_config.json").read_text())
    assert config["lora_rank"] == 8  # the row's own --set reached its run
    with tarfile.open(_unsplit(pack, "ippo_checkpoint.tar", tmp_path)) as t:
        assert any(n.endswith("state.pt") for n in t.getnames())
    with tarfile.open(pack / "ippo.tar") as t:
        got = t.getnames()
    assert "ippo_r8/adapter/adapter_config.json" in got and not any("checkpoint-" in n for n in got)
    assert "ippo stopped" not in proc.stdout and "ippo packed" in proc.stdout
