"""What the trainers share: typed YAML configs, metrics.jsonl (which steps, truncation on resume), atomic
checkpoints, RNG round trip, schedules, the accelerator, and the output folder's lock."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from multicrafter.errors import UserError
from train.checkpoints import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from train.config import load_config
from train.metrics_log import SHORT_RUN_STEPS, LogSchedule, MetricsLogger, read_metrics
from train.optim import EMA, OptimConfig, build_optimizer, lr_factor
from train.run_lock import LOCK_FILE, RunLock
from train.run_setup import claim_output_dir, resume_point, setup_accelerator


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str | None = None
    blocks: list[int] = field(default_factory=lambda: [0, 1])


@dataclass
class Outer:
    model: str = "tiny"
    flag: bool = False
    train: Inner = field(default_factory=Inner)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_load_config_types_and_overrides(tmp_path):
    p = _write(tmp_path, "model: toy\ntrain:\n  lr: 1e-4\n  steps: 3\n  blocks: [2]\n")
    cfg = load_config(p, Outer, {"train.steps": 7, "flag": True})
    assert cfg.model == "toy" and cfg.flag is True
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)   # YAML's "1e-4" string
    assert cfg.train.steps == 7 and cfg.train.blocks == [2] and cfg.train.name is None


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lrr: 1\n", "train.lrr"),
    ("train:\n  steps: 1.5\n", "train.steps"),
    ("flag: 3\n", "flag"),
    ("train:\n  blocks: [a]\n", "train.blocks[0]"),
    ("train: 5\n", "train"),
    ("model: [1\n", "not valid YAML"),
])
def test_load_config_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        load_config(_write(tmp_path, text), Outer)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml", Outer)


def test_metrics_truncated_on_resume(tmp_path):
    with MetricsLogger(tmp_path) as m:
        for s in range(1, 6):
            m.log({"step": s, "loss": torch.tensor(float(s))})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # torn last line of a killed run
    with MetricsLogger(tmp_path, resume_step=3) as m:
        m.log({"step": 4, "loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsLogger(tmp_path).close()  # a fresh run starts an empty file
    assert read_metrics(tmp_path) == []


def test_checkpoints_atomic_prune_and_ignore_partial(tmp_path):
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, {"w": torch.full((2,), float(s))}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # A run killed mid-write leaves a tmp dir, or a dir with the final name but no meta.json: neither counts.
    (tmp_path / "checkpoint-9.tmp-abc").mkdir()
    torch.save({"w": 0}, tmp_path / "checkpoint-9.tmp-abc" / "state.pt")
    (tmp_path / "checkpoint-8").mkdir()
    torch.save({"w": 0}, tmp_path / "checkpoint-8" / "state.pt")
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-3"
    assert load_checkpoint(latest)["w"].tolist() == [3.0, 3.0]
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "checkpoint-8")
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(1)}, keep_last=0)  # same step again replaces it
    assert load_checkpoint(tmp_path / "checkpoint-3")["w"].tolist() == [0.0]


def test_rng_round_trip():
    g = torch.Generator().manual_seed(5)
    state = capture_rng_state({"data": g})
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    restore_rng_state(state, {"data": g})
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b
    with pytest.raises(UserError):
        restore_rng_state(state, {"other": torch.Generator()})


def test_lr_schedule_and_optimizer():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 12) for s in range(12)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and f[-1] > 0.1 and f[-1] < f[5]
    w = torch.nn.Parameter(torch.ones(3))
    opt, sched = build_optimizer([w], cfg, 12)
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(UserError):
        build_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)], cfg, 12)


def test_ema_swap():
    w = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([w], decay=0.5)
    with torch.no_grad():
        w.fill_(2.0)
    ema.update()
    ema.swap_in()
    assert w.tolist() == [1.0, 1.0]
    ema.swap_out()
    assert w.tolist() == [2.0, 2.0]


def test_setup_accelerator_cpu():
    acc = setup_accelerator(mixed_precision="no", gradient_accumulation_steps=2, cpu=True)
    assert acc.gradient_accumulation_steps == 2 and acc.num_processes == 1
    with pytest.raises(UserError):
        setup_accelerator(mixed_precision="fp8", cpu=True)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_setups_are_refused(monkeypatch, kind):
    """Checkpoints hold whole weights written by the main process: a sharded launch is refused with one line."""
    from accelerate.utils import DistributedType

    class Launched:
        def __init__(self, **kwargs):
            self.distributed_type = DistributedType[kind]

    monkeypatch.setattr("train.run_setup.Accelerator", Launched)
    with pytest.raises(UserError, match=f"{kind} is not supported: training is single-process or data parallel"):
        setup_accelerator(cpu=True)


def test_resolve_resume_refuses_existing_checkpoints_without_resume(tmp_path, capsys):
    assert resolve_resume(tmp_path / "new", resume=False) is None
    assert resolve_resume(tmp_path, resume=True) is None
    assert "starting from step 0" in capsys.readouterr().out
    assert resolve_resume(tmp_path, resume=True, is_main=False) is None
    assert capsys.readouterr().out == ""
    save_checkpoint(tmp_path, 3, {"x": 1})
    with pytest.raises(UserError, match="already holds checkpoints: pass --resume") as err:
        resolve_resume(tmp_path, resume=False)
    assert "\n" not in str(err.value)
    assert resolve_resume(tmp_path, resume=True) == tmp_path / "checkpoint-3"


# ------------------------------------------------------------------------------------------------ which steps are logged


def test_short_runs_log_every_step_and_every_run_logs_its_last_step():
    tab_run = LogSchedule(every=10, horizon=2000, stop=6)          # --max-steps 6 of a long config (the Train tab)
    assert [s for s in range(1, 7) if tab_run.due(s)] == [1, 2, 3, 4, 5, 6]
    full = LogSchedule(every=10, horizon=2000, stop=2000)
    assert [s for s in range(1, 31) if full.due(s)] == [10, 20, 30] and full.due(2000)
    cut = LogSchedule(every=10, horizon=2000, stop=73)              # stopped early: its last step is logged too
    assert [s for s in range(61, 74) if cut.due(s)] == [70, 73]
    rare = LogSchedule(every=500, horizon=200, stop=200)            # log_every beyond the run: every step
    assert all(rare.due(s) for s in range(1, 201))
    assert SHORT_RUN_STEPS < 73


@pytest.mark.parametrize("every, horizon", [(1, 200), (10, 200), (7, 40), (300, 200)])
def test_a_resumed_metrics_file_equals_an_uninterrupted_one(tmp_path, monkeypatch, every, horizon):
    """A run logs the steps its schedule calls due, is cut at any step (its checkpoint) and resumed to the end, maybe
    through more cuts: the file then holds exactly the steps of one uninterrupted run to the same end."""
    import train.metrics_log

    # what the file holds is checked here, not that each line reaches the disk: thousands of fsyncs only cost time
    monkeypatch.setattr(train.metrics_log.os, "fsync", lambda fd: None)
    def run(folder, start, stop, resumed):
        schedule = LogSchedule(every, horizon, stop)
        with MetricsLogger(folder, resume_step=start if resumed else None, keep=schedule.due) as m:
            for s in range(start + 1, stop + 1):
                if schedule.due(s):
                    m.log({"step": s})

    for end in (30, 45, horizon):
        ref = tmp_path / f"full{end}"
        run(ref, 0, end, False)
        want = [r["step"] for r in read_metrics(ref)]
        for cuts in ([3], [17], [44], [12, 29], [60, 150], [51, 52, 53]):
            cuts = [c for c in cuts if c < end]
            folder = tmp_path / f"cut{end}-{'-'.join(map(str, cuts))}"
            start = 0
            for c in cuts:
                run(folder, start, c, start > 0)
                with open(folder / "metrics.jsonl", "a") as fh:   # steps a killed run logged after its checkpoint
                    fh.write(json.dumps({"step": c + 1}) + "\n")
                start = c
            run(folder, start, end, start > 0)
            assert [r["step"] for r in read_metrics(folder)] == want, (end, cuts)


# ------------------------------------------------------------------------------------------------ the output folder's lock

HOLD = """
import sys, time
from train.run_lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
        assert str(err.value) == (f"output dir {tmp_path} is used by a running job (pid {holder.pid}); stop it or "
                                  "choose another --output-dir")
        assert sorted(p.name for p in tmp_path.iterdir()) == before == [LOCK_FILE]
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid      # the owner's record is kept
    finally:
        holder.kill()   # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note and f"pid {holder.pid}" in note and "taking it over" in note
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_on_exceptions_and_held_per_folder(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path / "a"):
        assert (tmp_path / "a" / LOCK_FILE).is_file()
        with pytest.raises(UserError, match="is used by a running job"):
            RunLock(tmp_path / "a").acquire()
        with RunLock(tmp_path / "b"):      # another folder is free
            pass
        raise RuntimeError("the run failed")
    assert not (tmp_path / "a" / LOCK_FILE).exists()
    with RunLock(tmp_path / "a") as again:  # free again, no note about a dead run
        assert again.held


def test_an_unusable_output_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot use output dir") as err:
        RunLock(tmp_path / "file" / "run").acquire()
    assert "\n" not in str(err.value)


def test_claim_and_resume_point_in_a_single_process(tmp_path, capsys):
    acc = setup_accelerator(cpu=True)
    lock = claim_output_dir(acc, tmp_path)
    assert lock.held and capsys.readouterr().out == ""
    with pytest.raises(UserError, match="used by a running job"):
        claim_output_dir(acc, tmp_path)
    assert resume_point(acc, tmp_path, resume=False) is None
    save_checkpoint(tmp_path, 2, {"x": 1})
    with pytest.raises(UserError, match="already holds checkpoints"):
        resume_point(acc, tmp_path, resume=False)
    assert resume_point(acc, tmp_path, resume=True) == tmp_path / "checkpoint-2"
    lock.release()


def test_a_folder_made_by_the_lock_goes_again_when_the_run_wrote_nothing(tmp_path):
    unused, used = tmp_path / "a" / "run", tmp_path / "b"
    lock = RunLock(unused)
    lock.acquire()
    lock.release()
    assert not unused.exists() and unused.parent.exists()
    lock = RunLock(used)
    lock.acquire()
    (used / "metrics.jsonl").write_text("{}\n")
    lock.release()
    assert (used / "metrics.jsonl").is_file() and not (used / "run.lock").exists()
