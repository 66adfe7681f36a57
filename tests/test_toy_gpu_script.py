"""train/toy_gpu.sh, the GPU recipe that trains the toy within a fixed time budget: every stage runs in order, each is
packed into a complete tar as it ends, and the budget cuts off the open-ended stage (IPPO) and still packs its last
checkpoint.

The training commands are stand-ins (tests/fake_training_clis.py) whose command lines are checked against the real
commands' parsers and configs, and the script reads its time from a clock file ($CLOCK_FILE) that stands still while
the stages run: the test moves it to IPPO's cut-off once IPPO has saved a checkpoint, so nothing waits on real time."""

import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from tests import fake_training_clis as fake

ROOT = Path(__file__).resolve().parents[1]


def _start(script: str, env: dict[str, str]) -> subprocess.Popen:
    """The script in its own process group, so that a failing test can stop it and every stage it started."""
    return subprocess.Popen(["bash", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _wait_for(predicate, what: str, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    """Poll until `predicate()`; the limit only keeps a broken script from hanging the test."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the script ended before {what}: {out[-3000:]}{err[-3000:]}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(f"no {what} after {limit_s:.0f} s")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, limit_s: float = 60.0) -> tuple[str, str]:
    """The script's output once it has ended by itself (the limit only keeps a broken script from hanging)."""
    try:
        return proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise AssertionError(f"the script did not end within {limit_s:.0f} s of its budget running out") from None


def _checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name))


def test_every_stage_runs_is_packed_and_the_budget_cuts_ippo_after_a_checkpoint(tmp_path):
    runs, pack, clock = tmp_path / "runs", tmp_path / "pack", tmp_path / "clock"
    clock.write_text("0")
    budget = 1000
    env = {**os.environ, **fake.install(tmp_path), "CLOCK_FILE": str(clock), "FAKE_SEC_PER_STEP": "0.5",
           "RUNS": str(runs), "PACK": str(pack), "BUDGET": str(budget), "ADAPTER_RESERVE": "150", "PROBE": "3",
           "BASE_SET": "--set model.name=multicrafter/assets/toy --set data.batch_size=2",
           "ADAPTER_SET": "--set train.max_steps=2 --set output.checkpoint_every=1",
           # far more IPPO steps than the budget holds: it must be cut off, leaving its last checkpoint
           "IPPO_SET": f"--set train.max_steps={fake.OUT_OF_REACH} --set train.save_every=1"}
    proc = _start("train/toy_gpu.sh", env)
    ippo = runs / "toy_ippo"
    _wait_for(lambda: len(_checkpoints(ippo)) > 0, "IPPO checkpoint", proc)
    clock.write_text(str(budget - 15))  # IPPO keeps 15 s of the budget: it is cut off now
    out, err = _finish(proc)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]

    # the probe's step time (0.5 s) sets the horizon: (1000 s left - 150 kept - 30) / (0.5 * 1.04), in 50s
    assert "probe done: 0.5 s/step -> base horizon 1550 steps" in out
    assert "ippo stopped (rc 124)" in out, "IPPO should have been cut off at the budget"
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"\[toy_gpu \+(\d+)s\] done", last) and int(last.split("+")[1].split("s")[0]) <= budget, out

    calls = fake.calls(tmp_path)
    assert [c["module"] for c in calls] == ["train.pretrain"] * 2 + ["train.assemble_toy"] + ["train.pretrain"] * 3 + [
        "train.assemble_toy", "train.ippo"], calls
    parsed = fake.check_with_real_parsers(calls)
    probe, base = parsed[0], parsed[1]
    assert "--max-steps" in calls[0]["argv"] and calls[0]["argv"][calls[0]["argv"].index("--max-steps") + 1] == "3"
    assert "--resume" in calls[1]["argv"] and base.train.max_steps == 1550
    for cfg in (probe, base):
        assert cfg.train.mode == "base" and cfg.model.name == "multicrafter/assets/toy" and cfg.data.batch_size == 2
        assert cfg.train.train_text_encoders  # the base trains its text side too, and base.tar carries it
    assert parsed[2][1] == runs / "toy_base_gpu" / "pipeline"  # assemble --base
    rows = {Path(c["argv"][c["argv"].index("--output-dir") + 1]).name: cfg for c, cfg in zip(calls[3:6], parsed[3:6])}
    assert sorted(rows) == ["toy_adapter_attn", "toy_adapter_attn_moe", "toy_adapter_baseline"]
    assert all(c["env"].get("OMP_NUM_THREADS") == "4" for c in calls[3:6])  # the three share the host's cores
    for cfg in rows.values():
        assert cfg.train.mode == "adapter" and cfg.model.name == str(runs / "toy_base_gpu" / "pipeline")
        assert cfg.train.max_steps == 2
    assert set(parsed[6][2]) == {"baseline", "attn", "attn_moe"} and parsed[6][3]  # assemble --update, 3 adapters
    assert calls[7]["env"]["MULTICRAFTER_TOY_DIR"] == str(runs / "toy_gpu")
    assert parsed[7].train.max_steps == fake.OUT_OF_REACH

    names = sorted(p.name for p in pack.iterdir())
    assert names == ["adapter_attn.tar", "adapter_attn_moe.tar", "adapter_baseline.tar", "base.tar", "ippo.tar",
                     "ippo_checkpoint.tar"], names  # and no half-written .pack.* folder
    with tarfile.open(pack / "base.tar") as t:
        got = t.getnames()
    assert "toy_gpu/transformer/diffusion_pytorch_model.safetensors" in got
    assert "toy_gpu/text_encoder_2/model.safetensors" in got and "toy_base_gpu/metrics.jsonl" in got
    for row in ("baseline", "attn", "attn_moe"):
        with tarfile.open(pack / f"adapter_{row}.tar") as t:
            assert f"toy_adapter_{row}/adapter/adapter_config.json" in t.getnames()
    newest = _checkpoints(ippo)[-1]
    with tarfile.open(pack / "ippo_checkpoint.tar") as t:
        got = t.getnames()
    assert f"toy_ippo/checkpoint-{newest}/state.pt" in got and not any(".tmp" in n for n in got), got
    with tarfile.open(pack / "ippo.tar") as t:
        got = t.getnames()
    assert "ippo.log" in got and "toy_ippo/metrics.jsonl" in got and not any("checkpoint-" in n for n in got)


def _helpers(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source train/gpu_budget.sh; {script}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "BUDGET": "100", **env})


def test_latest_skips_checkpoints_being_written_and_orders_by_step(tmp_path):
    run = tmp_path / "a-b" / "run"  # dashes in the path must not confuse the ordering
    for name in ("checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-11.tmp-x1y2"):
        (run / name).mkdir(parents=True)
    assert _helpers(f"latest {run}").stdout.strip() == str(run / "checkpoint-10")
    assert _helpers(f"latest {tmp_path / 'none'}").stdout.strip() == ""


def test_bounded_skips_a_stage_without_time_and_stops_one_when_the_clock_runs_out(tmp_path):
    clock = tmp_path / "clock"
    clock.write_text("0")
    done = _helpers("bounded 96 true; echo rc=$?; bounded 10 true; echo rc=$?; bounded 10 false; echo rc=$?",
                    CLOCK_FILE=str(clock))
    assert done.stdout.split() == ["rc=124", "rc=0", "rc=1"]  # under 5 s to run in: not started
    proc = subprocess.Popen(["bash", "-c", "source train/gpu_budget.sh; bounded 10 sleep 300; echo rc=$?; log end"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "BUDGET": "100", "CLOCK_FILE": str(clock)})
    time.sleep(0.3)
    assert proc.poll() is None
    clock.write_text("90")  # 10 s left, all of them kept: the command is stopped
    out, _ = proc.communicate(timeout=30)
    assert out.split() == ["rc=124", "[gpu", "+90s]", "end"]
