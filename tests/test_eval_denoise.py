"""`python -m multicrafter.eval denoise`: one-step clean-image predictions scored per noise level."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from multicrafter import MultiCrafterPipeline
from multicrafter.eval.denoise import main, run_probe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    return MultiCrafterPipeline.from_pretrained("toy", adapter=False)


def test_near_clean_input_is_reproduced_and_heavy_noise_is_not(toy):
    """At t = 0.05 the estimate is the scene itself (the path through VAE, packing and the model is right); at
    t = 0.97 the model has to invent the subjects and scores clearly lower."""
    res, rows = run_probe(toy, [0.05, 0.97], n=2, keep=1)
    low, high = res["0.05"], res["0.97"]
    assert low["acc_shape"] >= 0.9 and low["acc_colour"] >= 0.9 and low["id_sim"] > 0.9
    assert high["id_sim"] < low["id_sim"] - 0.2
    assert len(rows) == 1 and len(rows[0]) == 3 and rows[0][1].shape == rows[0][0].shape


def test_cli_writes_json_and_figure(tmp_path):
    out, fig = tmp_path / "d.json", tmp_path / "d.png"
    assert main(["--model", "toy", "--n", "1", "--levels", "0.3", "--json", str(out), "--figure", str(fig)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 1 and list(res["levels"]) == ["0.3"] and 0.0 <= res["levels"]["0.3"]["id_sim"] <= 1.0
    assert Image.open(fig).size == (256, 128)  # ground truth | t = 0.3


@pytest.mark.parametrize("args, message", [
    (["--levels", "0.5,1.0"], "strictly between 0 and 1"),
    (["--levels", "half"], "comma-separated noise levels"),
    (["--n", "0"], "--n must be"),
])
def test_bad_input_one_line(args, message, run_main):
    from multicrafter.eval.__main__ import main as eval_main

    r = run_main(eval_main, ["denoise", *args])  # the command line, in this process (through run_cli)
    assert r.code != 0 and "Traceback" not in r.err
    assert r.err.strip().count("\n") == 0 and message in r.err


def test_bad_input_one_line_from_the_real_command():
    proc = subprocess.run([sys.executable, "-m", "multicrafter.eval", "denoise", "--n", "0"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--n must be" in proc.stderr
