"""Train tab: the job runner (streaming, one job at a time, stop kills the whole process group) and the run set-up
(config copy, key fields, dataset checks, resume, metrics plot) without running a real trainer."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import yaml

from demo import train_tab as tt
from demo.jobs import JobRunner, group_members
from multicrafter.errors import UserError
from tests.app_fixtures import scene_image

# prints numbered lines forever and keeps a grandchild (sleep) in its process group
STAND_IN = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "print('child', child.pid, flush=True)\n"
            "i = 0\n"
            "while True:\n"
            "    print('line', i, flush=True); i += 1; time.sleep(0.05)\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_runner_streams_refuses_a_second_job_and_stop_leaves_no_process(tmp_path):
    runner = JobRunner(grace_s=2.0)
    job = runner.start([sys.executable, "-c", STAND_IN], tmp_path / "run")
    seen = []
    for j in runner.follow(job, every_s=0.1):
        seen = list(j.lines)
        if len(seen) >= 5:
            break
    assert seen[0].startswith("child ") and seen[1:4] == ["line 0", "line 1", "line 2"]
    child = int(seen[0].split()[1])
    assert _alive(child) and group_members(job.pid)
    with pytest.raises(UserError, match="already running"):
        runner.start([sys.executable, "-c", "print(1)"], tmp_path / "other")
    assert runner.stop()
    assert not group_members(job.pid) and not _alive(child) and not _alive(job.pid)
    assert "stopped" in job.status() and (tmp_path / "run" / "log.txt").read_text().startswith("child ")
    assert json.loads((tmp_path / "run" / "job.json").read_text())["pid"] == job.pid
    assert not runner.stop()                                          # nothing left to stop
    done = runner.start([sys.executable, "-c", "print('a'); print('b')"], tmp_path / "next")
    assert [list(j.lines) for j in runner.follow(done)][-1] == ["a", "b"] and "finished (ok)" in done.status()


def test_progress_bar_redraws_collapse_to_one_line(tmp_path):
    runner = JobRunner()
    script = "import sys\nfor i in range(3): sys.stdout.write(f'\\rtrain:  {i}0%|##| {i}/3'); sys.stdout.flush()\n" \
             "print()\nprint('done')"
    job = runner.start([sys.executable, "-c", script], tmp_path / "run")
    job.done.wait(30)
    assert list(job.lines) == ["train:  20%|##| 2/3", "done"]


@pytest.fixture
def settings(tmp_path):
    return tt.TrainSettings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data")


def test_prepare_run_writes_the_config_copy_and_the_cli_contract(settings):
    assert "tiny_pretrain.yaml" in tt.list_configs(settings, "pretrain")
    assert all("ippo" in c for c in tt.list_configs(settings, "ippo"))
    text = tt.read_config(settings, "tiny_pretrain.yaml")
    argv, run_dir, meta = tt.prepare_run(settings, "pretrain", "tiny_pretrain.yaml", text, 3, None, "r1", "0.01", "0")
    assert argv[1:3] == ["-m", "train.pretrain"] and argv[argv.index("--max-steps") + 1] == "3"
    assert argv[argv.index("--output-dir") + 1] == str(run_dir) and run_dir.name == "r1"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 0.01 and cfg["attention_loss"]["weight"] == 0.0 and "toyworld" in cfg["data"]
    with pytest.raises(UserError, match="already exists"):
        tt.prepare_run(settings, "pretrain", "tiny_pretrain.yaml", text, 3, None, "r1")
    assert meta["mode"] == "pretrain"


def test_dataset_field_replaces_the_toyworld_source(settings, tmp_path):
    from multicrafter.dataset_format import DatasetWriter, SubjectSpec

    img = scene_image(tmp_path / "s.png")
    DatasetWriter(settings.data_dir / "mine").add_sample(img, "c", [SubjectSpec("a", mask=[[1] * 96] * 96)])
    text = tt.read_config(settings, "tiny_ippo.yaml")
    argv, run_dir, meta = tt.prepare_run(settings, "ippo", "tiny_ippo.yaml", text, 0, "mine", None)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["prompts"]["dataset"] == str((settings.data_dir / "mine").resolve()) and "toyworld" not in cfg["prompts"]
    assert "--max-steps" not in argv and argv[2] == "train.ippo"


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="nowhere"), "no dataset named"), (dict(dataset="../etc"), "invalid dataset name"),
    (dict(config_text="a: [unclosed"), "not valid YAML"), (dict(max_steps=-1), "max steps"),
    (dict(run_name="../x"), "invalid run name"), (dict(attention_weight="0.5", mode="ippo"), "attention_loss"),
    (dict(lr="fast"), "learning rate must be a number"), (dict(attention_weight="-1"), "Dice weight"),
])
def test_bad_train_inputs_are_refused_before_anything_runs(settings, kwargs, match):
    args = dict(mode="pretrain", config="tiny_pretrain.yaml", config_text="", max_steps=0, dataset=None,
                run_name=None)
    args.update(kwargs)
    if args["mode"] == "ippo":
        args["config"] = "tiny_ippo.yaml"
    with pytest.raises(UserError, match=match):
        tt.prepare_run(settings, **args)
    assert not settings.runs_dir.exists() or not any(settings.runs_dir.iterdir())


@pytest.mark.parametrize("resume", [False, True])
def test_a_module_callable_reward_is_refused_from_the_app(settings, resume):
    cfg = yaml.safe_load(tt.read_config(settings, "tiny_ippo.yaml"))
    cfg["reward"]["kind"] = "os:system"
    text = yaml.safe_dump(cfg)
    if not resume:
        with pytest.raises(UserError, match="module:callable"):
            tt.prepare_run(settings, "ippo", "tiny_ippo.yaml", text, 1)
        assert not settings.runs_dir.exists() or not any(settings.runs_dir.iterdir())
        return
    argv, run_dir, meta = tt.prepare_run(settings, "ippo", "tiny_ippo.yaml", "", 1, run_name="r3")
    (run_dir / tt.JOB_NAME).write_text(json.dumps(dict(meta, argv=argv)))
    (run_dir / "config.yaml").write_text(text)                # edited on disk after the start
    with pytest.raises(UserError, match="module:callable"):
        tt.resume_argv(settings, "r3")


def test_disabled_training_refuses(settings):
    settings.enabled = False
    with pytest.raises(UserError, match="disabled"):
        tt.prepare_run(settings, "pretrain", "tiny_pretrain.yaml", "", 1)


def test_resume_reuses_the_command_and_past_runs_are_listed(settings):
    runner = JobRunner()
    settings.modules = {"pretrain": "json.tool"}     # a harmless stand-in module: exits at once on the YAML
    job, _ = tt.start(settings, runner, "pretrain", "tiny_pretrain.yaml", "", 0, None, "r2")
    job.done.wait(30)
    (job.run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "loss_attn": 0.5}\n{"step": 2, "lo')
    (job.run_dir / "samples").mkdir()
    scene_image(job.run_dir / "samples" / "x.png")
    argv, run_dir, meta = tt.resume_argv(settings, "r2")
    assert argv[-1] == "--resume" and argv.count("--resume") == 1 and run_dir == job.run_dir
    assert tt.list_runs(settings) == ["r2"]
    fig, log, images, status = tt.run_summary(settings, "r2")
    assert [i[1] for i in images] == ["samples/x.png"] and "1 logged step" in status
    assert [ax.get_title() for ax in fig.axes] == ["loss", "loss_attn"]
    with pytest.raises(UserError):
        tt.run_path(settings, "../r2")


def test_metrics_reader_skips_partial_lines(tmp_path):
    from train.metrics_log import read_metrics

    assert tt.read_metrics is read_metrics                  # one reader for the trainers and the tab
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step": 1, "reward": 0.5}\nnot json\n[1, 2]\n{"step": 2, "reward": 0.7, "n": "\xff"}\n'
                  b'{"step": 3, "rew')
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert [ax.get_title() for ax in tt.metrics_figure(recs, "ippo").axes] == ["reward"]


def test_job_survives_until_stopped_when_nobody_follows(tmp_path):
    runner = JobRunner(grace_s=1.0)
    job = runner.start([sys.executable, "-c", STAND_IN], tmp_path / "run")
    time.sleep(0.5)
    assert runner.running and job.count > 0             # the reader drains the pipe without a follower
    runner.stop()
    assert not runner.running and not group_members(job.pid)
    assert os.path.getsize(tmp_path / "run" / "log.txt") > 0


@pytest.mark.slow
def test_a_toy_row_trained_from_the_tab_on_an_annotated_dataset_loads_and_generates(settings):
    """toy_adapter_attn.yaml from the Train tab's start handler, its dataset field naming a set saved with the
    library's writer (as the Annotate tab saves): 2 steps on the shipped toy base, then the run's adapter folder loads
    into MultiCrafterPipeline and generates."""
    import numpy as np
    import torch
    from PIL import Image

    from multicrafter import MultiCrafterPipeline
    from multicrafter.dataset_format import DatasetWriter, SubjectSpec
    from multicrafter.toyworld import build_sample

    writer = DatasetWriter(settings.data_dir / "annotated")
    for i in range(2):
        s = build_sample(0, i, size=128, ref_size=64, n_subjects=2)
        writer.add_sample(Image.fromarray(s.image), s.prompt, [
            SubjectSpec(sub["name"], mask=np.asarray(m, bool), reference=Image.fromarray(r))
            for sub, m, r in zip(s.scene["subjects"], s.masks, s.references)])
    cfg = yaml.safe_load(tt.read_config(settings, "toy_adapter_attn.yaml"))
    # edited in the tab's config box to stay small: one validation image of 2 steps, encodings in the run folder
    cfg["data"].update(num_validation=1, cache_dir=None)
    cfg["output"].update(validation_steps=2, progress=False)
    runner = JobRunner()
    job, meta = tt.start(settings, runner, "pretrain", "toy_adapter_attn.yaml", yaml.safe_dump(cfg), 2, "annotated",
                         "row", None, None)
    try:
        assert job.done.wait(600), job.tail(20)
    finally:
        runner.stop()
    assert "finished (ok)" in job.status(), job.tail(40)
    assert meta["dataset"] == str((settings.data_dir / "annotated").resolve())
    assert [r["step"] for r in tt.read_metrics(job.run_dir)][-1] == 2
    run_cfg = yaml.safe_load((job.run_dir / "config.yaml").read_text())
    assert run_cfg["model"]["name"] == "toy" and "toyworld" not in run_cfg["data"]

    pipe = MultiCrafterPipeline.from_pretrained("toy", adapter=str(job.run_dir / "adapter"))
    refs = [Image.open(p) for p in sorted((settings.data_dir / "annotated" / "refs").glob("*.png"))[:2]]
    out = pipe(prompt="two shapes", reference_images=refs, num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64) and np.asarray(out.images[0]).std() > 0
