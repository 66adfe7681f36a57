"""annotate's command lines over the dataset format: `python -m annotate.validate` and the folder import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from test_dataset_format import break_dataset, make_dataset

from annotate.import_folder import import_folder
from annotate.import_folder import main as import_folder_main
from annotate.validate import main as validate_main
from multicrafter.dataset_format import load_samples

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- validate
def test_validate_cli_prints_one_line_per_problem_and_fails(tmp_path, capsys):
    root = tmp_path / "broken"
    expected = break_dataset(root)
    assert validate_main([str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "metadata.jsonl:3: error: subject 0 (thing 0): mask size 10x10 differs from image size 56x40" in out
    for line in expected:   # every broken line is reported, each problem on its own line
        assert any(o.startswith(f"metadata.jsonl:{line}: error: ") for o in out), (line, out)
    assert out[-1].startswith(f"{root}: 8 samples, ") and not out[-1].endswith("valid")  # line 5 is not JSON


def test_validate_cli_passes_valid_dataset(tmp_path):
    root = tmp_path / "ok"
    make_dataset(root)
    (root / "masks" / "stray_0.png").write_bytes(b"left by an interrupted save")
    first = load_samples(root)[0].subjects[0]
    Image.fromarray(first.load_mask().astype(np.uint8)).save(first.mask)  # a 0/1 mask: readable, but flagged
    res = subprocess.run([sys.executable, "-m", "annotate.validate", str(root)], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0 and "valid" in res.stdout
    assert "warning: file not referenced by any line: masks/stray_0.png" in res.stdout
    assert "metadata.jsonl:1: warning: subject 0 (thing 0): mask uses values 0/1" in res.stdout
    res = subprocess.run([sys.executable, "-m", "annotate.validate", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr


# ---------------------------------------------------------------- import
def test_import_folder(tmp_path, monkeypatch, run_main):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (300, 120), (200, 10, 10)).save(src / "red car.png")
    (src / "red car.txt").write_text("a red car\n")
    Image.new("RGB", (30, 20), (10, 10, 200)).save(src / "b.jpg")
    (src / "captions.jsonl").write_text(json.dumps({"file_name": "b.jpg", "caption": "blue"}) + "\n")
    (src / "broken.png").write_bytes(b"nope")
    (src / "readme.md").write_text("x")
    rep = import_folder(src, tmp_path / "ds", max_side=100)
    assert sorted(rep.imported) == ["b", "red_car"]
    assert dict(rep.skipped).keys() == {"broken.png", "readme.md"}
    assert any("downscaled from 300x120 to 100x40" in n for n in rep.notes)
    samples = {s.name: s for s in load_samples(tmp_path / "ds")}
    assert samples["red_car"].caption == "a red car" and samples["b"].caption == "blue"
    assert Image.open(samples["red_car"].image).size == (100, 40)
    assert samples["b"].subjects == []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "annotate.import_folder", str(src), "--out", str(tmp_path / "d2")],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "imported 2 images" in res.stdout and "skipped broken.png" in res.stdout
    # in this process (through run_cli), which saves a second interpreter its transformers import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run_main(import_folder_main, [src, "--out", tmp_path / "d3", "--florence",
                                        "florence-community/Florence-2-base-ft"])
    assert res.code == 2 and res.err.count("\n") == 1
    assert "Florence-2 (florence-community/Florence-2-base-ft) is not available offline" in res.err
    assert not (tmp_path / "d3").exists()  # failed before writing anything
