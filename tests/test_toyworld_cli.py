"""`python -m multicrafter.eval toy`: ground-truth sanity row, JSON keys, one-line errors, and the model path.

The bad inputs run the command in this process (through run_cli); one also runs as a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multicrafter.errors import UserError
from multicrafter.eval.toyworld_scores import main as eval_toy_main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multicrafter.eval", "toy", *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.fixture
def run(run_main):
    """`run(*args)`: `python -m multicrafter.eval toy ARGS` in this process (through run_cli); `.code`, `.err`."""
    from multicrafter.eval.__main__ import main

    return lambda *args: run_main(main, ["toy", *args])


def test_ground_truth_row_json_and_table(tmp_path, capsys):
    out = tmp_path / "gt.json"
    assert eval_toy_main(["--model", "ground-truth", "--n", "6", "--seeds", "0,1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("id_sim", "leakage", "layout", "quality", "overall"):
        assert isinstance(res[key], float) and len(res["per_seed"][key]) == 2 and key in res["std"]
    assert res["n"] == 12 and res["seeds"] == [0, 1] and res["split"] == "test"
    assert res["id_sim"] >= 0.95 and res["leakage"] <= 0.05 and res["layout"] >= 0.95
    assert set(res["attribute_accuracy"]) == {"shape", "colour", "pattern"}
    groups = res["by_subjects"]  # the same scenes split by how many subjects they hold
    assert set(groups) <= {"1", "2", "3"} and len(groups) >= 2 and sum(g["n"] for g in groups.values()) == 12
    assert abs(sum(g["id_sim"] * g["n"] for g in groups.values()) / 12 - res["id_sim"]) < 1e-9
    table = capsys.readouterr().out
    assert "| id_sim |" in table and "seed 1" in table and "by subjects: " in table
    # fixed seeds: a rerun gives the same numbers, another seed other scenes
    again = tmp_path / "again.json"
    eval_toy_main(["--model", "ground-truth", "--n", "6", "--seeds", "0,1", "--json", str(again)])
    assert json.loads(again.read_text())["per_seed"] == res["per_seed"]


def test_subjects_and_similar_prob_choose_the_held_out_scenes(tmp_path):
    out = tmp_path / "three.json"
    assert eval_toy_main(["--model", "ground-truth", "--n", "5", "--subjects", "3", "--similar-prob", "1",
                          "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["by_subjects"]) == ["3"] and res["by_subjects"]["3"]["n"] == 5
    assert res["similar_pairs"]["n"] == 5  # every scene holds a similar pair
    assert res["subjects"] == [3] and res["similar_prob"] == 1.0


def test_split_train_scores_the_toys_own_training_scenes(tmp_path):
    """--split train --subjects 1,2,3 regenerates exactly the scenes the toy trained on (the memorisation check)."""
    from multicrafter.eval.toyworld_scores import evaluate_scenes
    from multicrafter.toyworld import build_sample
    from multicrafter.toyworld.subjects import by_id, split_of

    seen = []

    def generate(sample, seeds):
        seen.append(sample)
        return [sample.image] * len(seeds)

    evaluate_scenes(4, [0], generate, subjects=(1, 2, 3), split="train")
    trained = [build_sample(0, i, split="train", size=128, ref_size=64, similar_prob=0.3, n_subjects=(1, 2, 3))
               for i in range(4)]
    assert [s.prompt for s in seen] == [t.prompt for t in trained]
    assert {split_of(by_id(x["id"])) for s in seen for x in s.scene["subjects"]} == {"train"}
    held_out = []
    evaluate_scenes(4, [0], lambda s, seeds: held_out.append(s) or [s.image], subjects=(1, 2, 3))
    assert {split_of(by_id(x["id"])) for s in held_out for x in s.scene["subjects"]} == {"test"}
    out = tmp_path / "train.json"
    assert eval_toy_main(["--model", "ground-truth", "--n", "2", "--split", "train", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["split"] == "train"


@pytest.mark.parametrize("args, message", [
    (["--model", "ground-truth", "--n", "0"], "--n must be"),
    (["--model", "ground-truth", "--n", "2", "--size", "100"], "multiple of 16"),
    (["--model", "toy", "--n", "2", "--adapter", "attn", "--no-adapter"], "not both"),
    (["--model", "toy", "--n", "2", "--true-cfg", "0.5"], "--true-cfg must be >= 1"),
    (["--model", "ground-truth", "--n", "2", "--no-shape-words"], "ground truth sees none"),
    (["--model", "ground-truth", "--n", "2", "--prompts", "positions"], "ground truth sees none"),
    (["--model", "tiny", "--n", "1", "--device", "gpu0"], "is not a torch device"),
    (["--model", "ground-truth", "--n", "2", "--subjects", "5"], "between 1 and 4"),
    (["--model", "ground-truth", "--n", "2", "--similar-prob", "1.5"], "--similar-prob must be in [0, 1]"),
])
def test_bad_input_one_line(run, args, message):
    r = run(*args)
    assert r.code != 0 and "Traceback" not in r.err
    assert r.err.strip().startswith("error:") and r.err.strip().count("\n") == 0
    assert message in r.err


def test_bad_input_one_line_from_the_real_command():
    proc = _run("--model", "tiny", "--n", "1", "--device", "gpu0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and proc.stderr.strip().count("\n") == 0
    assert "is not a torch device" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(run):
    r = run("--model", "tiny", "--n", "1", "--device", "cuda")
    assert r.code != 0 and "Traceback" not in r.err and "torch sees no CUDA GPU" in r.err


def test_unloadable_model_is_a_user_error():
    with pytest.raises(UserError, match="model"):
        eval_toy_main(["--model", "/no/such/model", "--n", "1"])


def test_model_path_runs_on_tiny_pipeline(tmp_path):
    """The real generation path, on the random tiny model: it must produce scorable images and a full JSON."""
    out = tmp_path / "tiny.json"
    assert eval_toy_main(["--model", "tiny", "--n", "1", "--steps", "1", "--size", "64", "--seeds", "0,1",
                          "--json", str(out), "--save-images", str(tmp_path / "imgs")]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and res["n"] == 2 and res["n_scenes"] == 1 and 0.0 <= res["overall"] <= 1.0
    assert res["id_sim"] < 0.9  # a random model does not reproduce the subjects
    assert res["guidance"] == 3.5  # tiny has no sampling file: FLUX's default
    assert res["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto, recorded
    assert sorted(p.name for p in (tmp_path / "imgs").glob("*.png")) == ["seed0_0000.png", "seed1_0000.png"]


def test_seeds_of_a_scene_run_as_one_batch_with_the_same_images():
    """Batching the seeds of a scene must not change what each seed generates (one generator per image)."""
    from multicrafter.eval.toyworld_scores import _model_runner
    from multicrafter.toyworld import build_sample

    generate, used = _model_runner("tiny", None, 2, None)
    sample = build_sample(0, 0, split="test", size=64, ref_size=32)
    both = generate(sample, [5, 7])
    alone = generate(sample, [7])
    a, b = np.asarray(both[1], dtype=float), np.asarray(alone[0], dtype=float)
    assert np.abs(a - b).max() <= 2  # the same image up to batched-matmul rounding
    assert np.abs(np.asarray(both[0], dtype=float) - a).max() > 10  # and the seeds differ


@pytest.mark.parametrize("flags, expected", [([], None), (["--adapter", "attn"], "attn"), (["--no-adapter"], False)])
def test_no_adapter_reaches_the_loader_as_false(monkeypatch, flags, expected):
    """`toy` loads its folder's default adapter for adapter=None; the base row needs False, i.e. --no-adapter."""
    import multicrafter.eval.toyworld_scores as toy_eval

    seen = []

    def fake_runner(model, adapter, steps, guidance, true_cfg=None, prompt_style="full", device="cpu", quantize="none"):
        seen.append(adapter)
        raise UserError("stop here")

    monkeypatch.setattr(toy_eval, "_model_runner", fake_runner)
    with pytest.raises(UserError, match="stop here"):
        eval_toy_main(["--model", "toy", "--n", "1", *flags])
    assert seen == [expected] and (seen[0] is False) == (expected is False)


def test_true_cfg_changes_the_images_and_is_recorded():
    """--true-cfg > 1 guides against the empty prompt (a second transformer call per step): same seed, other image."""
    from multicrafter.eval.toyworld_scores import _model_runner
    from multicrafter.toyworld import build_sample

    sample = build_sample(0, 0, split="test", size=64, ref_size=32)
    plain, used_plain = _model_runner("tiny", None, 2, None, 1.0)
    guided, used_guided = _model_runner("tiny", None, 2, None, 4.0)
    a, b = (np.asarray(g(sample, [3])[0], dtype=float) for g in (plain, guided))
    assert used_plain["true_cfg"] == 1.0 and used_guided["true_cfg"] == 4.0
    assert np.abs(a - b).max() > 10


def test_prompt_probes_drop_exactly_their_words_from_what_the_pipeline_sees(monkeypatch):
    """The probe's prompts are the scene's prompt minus each subject's shape word, and reach the pipeline."""
    import multicrafter
    from multicrafter.eval.toyworld_scores import _model_runner
    from multicrafter.toyworld import build_sample
    from multicrafter.toyworld.subjects import SHAPES

    seen: list[str] = []
    real_call = multicrafter.MultiCrafterPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["prompt"])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(multicrafter.MultiCrafterPipeline, "__call__", spy)
    sample = build_sample(0, 1, split="test", size=64, ref_size=32)
    for style in ("full", "no-shape", "positions"):
        generate, _ = _model_runner("tiny", None, 1, None, 1.0, prompt_style=style)
        generate(sample, [0])
    full, probe, positions = seen
    assert full == sample.prompt
    dropped = [w for w in full.replace(",", "").split() if w not in probe.replace(",", "").split()]
    assert dropped and all(w in SHAPES for w in dropped)
    assert len(dropped) == len(sample.scene["subjects"])  # one shape word per subject, nothing else
    # positions: each subject is 'an object <where>'; no colour, pattern or shape word is left, the background stays
    words = set(positions.replace(",", "").split())
    for subject in sample.scene["subjects"]:
        assert not {*subject["colours"], subject["pattern"], subject["shape"]} & words
    assert positions.count("an object") == len(sample.scene["subjects"])
    assert positions.endswith(full.split(", ")[-1])


def test_quantize_reaches_the_loader_and_a_bad_mode_is_one_line():
    with pytest.raises(UserError, match="--quantize must be one of none, int8, fp8, nf4, got 'int4'"):
        eval_toy_main(["--model", "tiny", "--n", "1", "--quantize", "int4"])
