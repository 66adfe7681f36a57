"""`python -m multicrafter.eval faces`: single-image and dataset modes, JSON/markdown, one-line errors.

Bad inputs run the command in this process (through run_cli); one also runs as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import insightface
import pytest
from PIL import Image

from multicrafter.eval.faces_cli import main
from multicrafter.io import save_image_atomic

T1 = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
ROOT = Path(__file__).resolve().parents[1]
# Boxes of two of t1's faces (dlib HOG, 1280x886 image), padded: references cut from the group photo.
BOXES = {"left": (15, 234, 219, 438), "middle": (402, 250, 627, 474)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faces_cli")
    group = Image.open(T1).convert("RGB")
    small = group.resize((960, 664))   # keep the CLI tests quick
    save_image_atomic(small, d / "gen.png")
    for name, box in BOXES.items():
        save_image_atomic(group.crop(box), d / f"{name}.png")
    save_image_atomic(Image.new("RGB", (320, 320), (200, 180, 150)), d / "blank.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return d


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "multicrafter.eval", "faces", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


@pytest.fixture
def run(run_main):
    """`run(*args)`: `python -m multicrafter.eval faces ARGS` in this process (through run_cli); `.code`, `.out`, `.err`."""
    from multicrafter.eval.__main__ import main as eval_main

    return lambda *args: run_main(eval_main, ["faces", *args])


def test_single_image_json_and_markdown(files, capsys):
    out, md = files / "out.json", files / "out.md"
    assert main(["--image", str(files / "gen.png"), "--ref", str(files / "left.png"), "--ref",
                 str(files / "middle.png"), "--ref", str(files / "blank.png"), "--json", str(out),
                 "--markdown", str(md)]) == 0
    res = json.loads(out.read_text())
    assert {"face_sim", "matches", "faces_detected", "per_reference", "notes", "scale"} <= set(res)
    assert res["faces_detected"] == 6 and res["reference_faces"] == [1, 1, 0]
    assert [m["reference"] for m in res["matches"]] == [0, 1]
    assert all(m["similarity"] > 0.5 for m in res["matches"])
    assert res["face_sim"] == pytest.approx(sum(m["similarity"] for m in res["matches"]) / 3)
    table = md.read_text()
    assert "| blank.png | — | 0.0000 | — |" in table and f"**{res['face_sim']:.4f}**" in table
    printed = capsys.readouterr().out
    assert "note: no face found in reference 2" in printed


def test_dataset_mode(files, tmp_path):
    ds = tmp_path / "ds"
    (ds / "refs").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    for name in BOXES:
        (ds / "refs" / f"{name}.png").write_bytes((files / f"{name}.png").read_bytes())
    (run / "0001.png").write_bytes((files / "gen.png").read_bytes())
    (run / "0002.png").write_bytes((files / "blank.png").read_bytes())
    subjects = [{"name": n, "kind": "face", "reference": f"refs/{n}.png"} for n in BOXES]
    lines = [{"file_name": "images/0001.png", "caption": "x", "subjects": subjects},
             {"file_name": "images/0002.png", "refs": ["refs/left.png"]}]
    (ds / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "o.json"
    assert main(["--dataset", str(ds), "--images", str(run), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 2 and [s["file_name"] for s in res["samples"]] == ["images/0001.png", "images/0002.png"]
    first, second = res["samples"]
    assert first["face_sim"] > 0.5 and second["face_sim"] == 0 and second["faces_detected"] == 0
    assert res["face_sim"] == pytest.approx((first["face_sim"] + second["face_sim"]) / 2)
    assert all(m["sample"] == "images/0001.png" for m in res["matches"]) and len(res["matches"]) == 2


@pytest.mark.parametrize("args, expect", [
    (["--image", "{d}/corrupt.png", "--ref", "{d}/left.png"], "not a valid image"),
    (["--image", "{d}/gen.png", "--ref", "{d}/missing.png"], "image not found"),
    (["--image", "{d}/gen.png", "--ref", "{d}/left.png", "--backend", "insightface", "--insightface-root", "{d}"],
     "insightface model pack 'buffalo_l' not found"),
    (["--dataset", "{d}"], "no metadata.jsonl"),
])
def test_bad_input_is_one_line(files, run, args, expect):
    r = run(*[a.format(d=files) for a in args])
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.err


def test_bad_input_is_one_line_from_the_real_command(files):
    proc = run_cli("--image", str(files / "corrupt.png"), "--ref", str(files / "left.png"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a valid image" in lines[0], proc.stderr


def test_help(run):
    r = run("--help")
    assert r.code == 0 and "--backend" in r.out and "--dataset" in r.out


def test_missing_metric_weights_are_reported_not_invented(files, capsys):
    out = files / "all.json"
    assert main(["--image", str(files / "gen.png"), "--ref", str(files / "left.png"), "--metrics", "all",
                 "--prompt", "six people", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["clip_t"] is None and res["clip_i"] is None and res["dino_i"] is None and res["aes"] is None
    assert set(res["missing"]) == {"clip_t", "clip_i", "dino_i", "aes"}
    assert all("\n" not in why and "not available" in why and "pass --" in why for why in res["missing"].values())
    assert res["face_sim"] > 0.5                                  # Face-Sim still works offline
    printed = capsys.readouterr().out
    assert "| CLIP-T | missing |" in printed and "note: AES missing: aesthetic head (" in printed


def test_extra_metrics_from_local_folders(files, tmp_path):
    import torch
    from test_metrics_models import PROJ, _laion_head, build_tiny_clip
    from transformers import ViTConfig, ViTModel

    build_tiny_clip(tmp_path / "clip")
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    torch.save({f"layers.{k}": v for k, v in _laion_head(PROJ).state_dict().items()}, tmp_path / "head.pth")
    out = tmp_path / "o.json"
    assert main(["--image", str(files / "gen.png"), "--ref", str(files / "left.png"), "--ref", str(files / "gen.png"),
                 "--metrics", "clip_t,clip_i,dino_i,aes", "--prompt", "six people", "--clip-model",
                 str(tmp_path / "clip"), "--dino-model", str(tmp_path / "dino"), "--aes-clip", str(tmp_path / "clip"),
                 "--aes-head", str(tmp_path / "head.pth"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["missing"] == {}
    assert all(isinstance(res[k], float) for k in ("clip_t", "clip_i", "dino_i", "aes"))
    assert -1 <= res["clip_t"] <= 1 and -1 <= res["clip_i"] <= 1 and -1 <= res["dino_i"] <= 1
    assert res["clip_i"] > 0 and res["dino_i"] > 0    # one reference is the image itself (cosine 1)


def test_clip_t_without_prompt_is_refused(files, run):
    r = run("--image", str(files / "gen.png"), "--ref", str(files / "left.png"), "--metrics", "clip_t")
    assert r.code == 2 and r.err.strip() == "error: CLIP-T needs --prompt (see --help)"
    r = run("--image", str(files / "gen.png"), "--metrics", "clip_x")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1


def _meta(ds: Path, *lines: dict | str) -> Path:
    ds.mkdir(parents=True, exist_ok=True)
    (ds / "metadata.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return ds


@pytest.mark.parametrize("line, expect", [
    ({"file_name": "../outside.png", "refs": ["refs/a.png"]}, ":2: file_name: path must not contain '..'"),
    ({"file_name": "/etc/hostname", "refs": ["refs/a.png"]}, ":2: file_name: path must be relative"),
    ({"file_name": "x.png", "refs": ["/etc/hostname"]}, ":2: reference: path must be relative"),
    ({"file_name": "x.png", "subjects": [{"kind": "face", "reference": "../../a.png"}]}, ":2: reference: path must"),
    ({"file_name": "x.png", "refs": [3]}, ":2: reference: path must be a non-empty string"),
    ({"file_name": "x.png", "refs": "refs/a.png"}, ":2: 'refs' must be a list"),
    ({"file_name": "x.png", "subjects": {"a": 1}}, ":2: 'subjects' must be a list"),
])
def test_dataset_paths_stay_inside_and_errors_name_the_line(tmp_path, line, expect):
    from multicrafter.errors import UserError

    ds = _meta(tmp_path / "ds", {"file_name": "ok.png", "refs": ["refs/a.png"]}, line)
    with pytest.raises(UserError) as err:
        main(["--dataset", str(ds)])
    msg = str(err.value)
    assert "\n" not in msg and "metadata.jsonl" in msg and expect in msg, msg


def test_generated_images_folder_is_contained_too(tmp_path):
    from multicrafter.errors import UserError

    (tmp_path / "secret.png").write_bytes(b"outside the run folder")
    ds = _meta(tmp_path / "ds", {"file_name": "../secret.png", "refs": ["refs/a.png"]})
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"metadata.jsonl:1: file_name: path must not contain '\.\.'"):
        main(["--dataset", str(ds), "--images", str(tmp_path / "run")])


def test_dataset_non_dict_subjects_are_skipped_with_a_note(tmp_path):
    from multicrafter.eval.faces_cli import read_samples

    ds = _meta(tmp_path / "ds", {"file_name": "a.png", "subjects": ["left", {"kind": "face", "reference": "r.png"},
                                                                   {"kind": "object", "reference": "o.png"}]})
    notes: list[str] = []
    [(name, image, refs, _)] = read_samples(ds, None, notes)
    assert image == (ds / "a.png").resolve() and refs == [(ds / "r.png").resolve()]
    assert len(notes) == 1 and "metadata.jsonl:1: subject 0 is not a JSON object, skipped" in notes[0]
