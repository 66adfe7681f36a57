"""Pre-training and IPPO data parallel on 2 CPU processes (`accelerate launch` with train/configs/accelerate_ddp.yaml,
gloo): a run killed with SIGKILL mid-run and resumed ends with the same adapter weights and metrics as an
uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoints import list_checkpoints
from train.metrics_log import read_metrics
from train.run_lock import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
# the tiny model at its smallest, 4 steps with a checkpoint after each: (config, overrides, per-run timing keys)
RUNS = {
    "ippo": ("tiny_ippo.yaml",
             ["sampling.num_steps=2", "sampling.height=16", "sampling.width=16", "sampling.group_size=2",
              "sampling.micro_batch=2", "window.size=1", "train.groups_per_step=1", "train.sample_every=0",
              "train.save_every=1", "train.keep_last=2", "train.max_steps=4", "gspo.inner_updates=1"],
             ("time_rollout", "time_reward", "time_train")),
    "pretrain": ("tiny_pretrain.yaml",
                 ["data.toyworld.n=4", "data.resolution=32", "train.max_steps=4", "output.checkpoint_every=1",
                  "output.keep_last=2", "output.validation_steps=1", "output.progress=false"],
                 ("sec_per_step",)),
}


def _launch(stage: str, out: Path, *extra: str) -> subprocess.Popen:
    config, small, _ = RUNS[stage]
    sets = [a for s in small for a in ("--set", s)]
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
            str(REPO / "train/configs/accelerate_ddp.yaml"), "-m", f"train.{stage}", "--config",
            str(REPO / "train/configs" / config), "--output-dir", str(out), *sets, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torch's launcher starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc: subprocess.Popen) -> str:
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode == 0, log[-3000:]
    return log


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}:{k}": v for f in sorted((out / "adapter").glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the launcher's workers through /proc")
@pytest.mark.parametrize("stage", ["ippo", "pretrain"])
def test_two_processes_killed_and_resumed_equal_an_uninterrupted_run(tmp_path, stage):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _finish(_launch(stage, full))

    proc = _launch(stage, cut)
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(cut) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        _kill_tree(proc.pid)     # mid-run, no clean-up: the lock file and maybe a partial write stay behind
        proc.wait()
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = list_checkpoints(cut)[-1][0]
    assert 1 <= killed_at < 4 and (cut / LOCK_FILE).is_file()

    log = _finish(_launch(stage, cut, "--resume"))
    assert "taking it over" in log and f"resumed from {cut / f'checkpoint-{killed_at}'}" in log
    volatile = RUNS[stage][2]
    strip = lambda recs: [{k: v for k, v in r.items() if k not in volatile} for r in recs]  # noqa: E731
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and strip(a) == strip(b)
    wa, wb = _adapter(full), _adapter(cut)
    assert wa and set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)   # the adapter really trained
    assert not (cut / LOCK_FILE).exists() and not (full / LOCK_FILE).exists()
