"""train/toy_gpu.sh, the one-shot GPU pass: it must end inside its budget and leave complete packs behind, since a
GPU with a hard time limit gives one try (here on CPU, with every stage shrunk)."""

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_toy_gpu_script_ends_in_budget_and_packs_every_stage(tmp_path):
    runs, pack, shim = tmp_path / "runs", tmp_path / "pack", tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the script calls `python`
    (shim / "python").chmod(0o755)
    data = (f"--set data.toyworld.n=8 --set data.toyworld.folder={runs}/tw --set data.cache_dir={runs}/cache "
            "--set data.num_validation=1 --set output.validation_steps=2 --set data.batch_size=2")
    budget = 240  # generous: the three adapter runs share the CPU, and a loaded machine must not cut them off
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "RUNS": str(runs), "PACK": str(pack),
           "BUDGET": str(budget), "ADAPTER_RESERVE": "150", "PROBE": "3", "MAX_BASE_STEPS": "6",
           "BASE_SET": f"{data} --set model.name=assets/toy",
           "ADAPTER_SET": f"{data} --set train.max_steps=2 --set output.checkpoint_every=1",
           # IPPO gets far more steps than fit: it must be cut off at the budget and still pack a checkpoint
           "IPPO_SET": (f"--set prompts.toyworld.n=2 --set prompts.toyworld.folder={runs}/twi "
                        "--set sampling.num_steps=2 --set sampling.group_size=2 --set window.size=1 "
                        "--set train.max_steps=10000 --set train.groups_per_step=1 --set train.save_every=1 "
                        "--set train.sample_every=0")}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "train/toy_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=budget + 120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < budget + 15, f"the script ran {elapsed:.0f} s on a {budget} s budget"
    assert "base horizon 6 steps" in proc.stdout
    names = sorted(p.name for p in pack.iterdir())
    assert names == ["adapter_attn.tar", "adapter_attn_moe.tar", "adapter_baseline.tar", "base.tar", "ippo.tar",
                     "ippo_checkpoint.tar"], names
    with tarfile.open(pack / "base.tar") as t:
        assert "toy_gpu/transformer/diffusion_pytorch_model.safetensors" in t.getnames()
        assert "toy_gpu/text_encoder_2/model.safetensors" in t.getnames()   # the base trains its text side too
    for row in ("baseline", "attn", "attn_moe"):
        with tarfile.open(pack / f"adapter_{row}.tar") as t:
            assert f"toy_adapter_{row}/adapter/adapter_config.json" in t.getnames()
    with tarfile.open(pack / "ippo_checkpoint.tar") as t:
        assert any(n.endswith("state.pt") for n in t.getnames())
    assert "ippo stopped (rc 124)" in proc.stdout, "IPPO should have been cut off at the budget"
