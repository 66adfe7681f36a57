"""`python -m multicrafter.generate`: a run on tiny, and one-line errors for each bad input.

The runs call the command's `main` through `run_cli` in this process (the `run_main` fixture); one bad input also
runs as a real subprocess, proving the one-line, no-traceback exit end to end."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from multicrafter.generation_params import read_generation_params


def subprocess_run(*args):
    return subprocess.run([sys.executable, "-m", "multicrafter.generate", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def run(run_main):
    """`run(*args)`: the command line in this process; `.code`, `.out`, `.err`."""
    from multicrafter.generate import main

    return lambda *args: run_main(main, args)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / f"{name}.png")
    (d / "text.png").write_text("this is not an image")
    (d / "corrupt.png").write_bytes((d / "a.png").read_bytes()[:120])
    return d


def test_generate_writes_image_metadata_and_attention(run, refs, tmp_path):
    out, att = tmp_path / "out.png", tmp_path / "att.png"
    r = run("--model", "tiny", "--ref", str(refs / "a.png"), "--ref", str(refs / "b.png"), "--prompt", "a cat",
            "--out", str(out), "--attention-out", str(att), "--height", "48", "--width", "64", "--steps", "2")
    assert r.code == 0, r.err
    assert Image.open(out).size == (64, 48)
    params = read_generation_params(out)
    assert params["prompt"] == "a cat" and params["seed"] == 0 and params["references"] == ["a.png", "b.png"]
    assert Image.open(att).width > Image.open(att).height  # image + one panel per subject


def test_true_cfg_is_used_and_recorded(run, refs, tmp_path):
    """The toy model's own default (true CFG 3 against the empty prompt) reaches the pipeline; --true-cfg 1 turns
    it off, and the image changes."""
    outs = {}
    for flags in ([], ["--true-cfg", "1"]):
        out = tmp_path / f"cfg{len(flags)}.png"
        r = run("--ref", str(refs / "a.png"), "--prompt", "a red circle", "--out", str(out), "--steps", "2", *flags)
        assert r.code == 0, r.err
        outs[len(flags)] = (read_generation_params(out), np.asarray(Image.open(out), dtype=float))
    (guided, a), (plain, b) = outs[0], outs[2]
    assert guided["true_cfg_scale"] == 3.0 and guided["negative_prompt"] == ""
    assert plain["true_cfg_scale"] == 1.0 and "negative_prompt" not in plain
    assert np.abs(a - b).max() > 10


BAD_INPUTS = [
    (["--ref", "{d}/missing.png"], "not found"),
    (["--ref", "{d}/corrupt.png"], "not a valid image"),
    (["--ref", "{d}/text.png"], "not a valid image"),
    (["--ref", "{d}/a.png"] * 5, "at most 4"),
    (["--height", "50"], "multiple of 16"),
    (["--model", "nobody/unknown-model"], "unavailable"),
    (["--ref", "{d}/a.png", "--ref", "{d}/b.png", "--kind", "face"], "one --kind per --ref"),
    (["--true-cfg", "0.5"], "--true-cfg must be >= 1"),
]


def _bad_args(refs, tmp_path, extra):
    args = [a.replace("{d}", str(refs)) for a in extra]
    model = [] if "--model" in args else ["--model", "tiny"]
    return [*model, *args, "--prompt", "x", "--out", str(tmp_path / "o.png")]


def _one_error_line(code, stderr, message):
    assert code != 0
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_inputs_one_line_no_traceback(run, refs, tmp_path, extra, message):
    r = run(*_bad_args(refs, tmp_path, extra))
    _one_error_line(r.code, r.err, message)
    assert not (tmp_path / "o.png").exists()


def test_a_bad_input_is_one_line_from_the_real_command(refs, tmp_path):
    extra, message = BAD_INPUTS[1]
    r = subprocess_run(*_bad_args(refs, tmp_path, extra))
    _one_error_line(r.returncode, r.stderr, message)
    assert not (tmp_path / "o.png").exists()


def test_help(run):
    r = run("--help")
    assert r.code == 0 and "--ref" in r.out and "--attention-out" in r.out


def test_face_kind_crops_like_the_app(run, refs, tmp_path):
    """--kind face goes through the same subject_reference rule as the app: cropped to the face, or the whole image
    with a note when none is found (here: noise), and the kinds are recorded."""
    out = tmp_path / "out.png"
    r = run("--model", "tiny", "--ref", str(refs / "a.png"), "--kind", "face", "--prompt", "a person",
            "--out", str(out), "--steps", "1", "--height", "32", "--width", "32")
    assert r.code == 0, r.err
    assert "no face found" in r.out and "using the whole image" in r.out
    assert read_generation_params(out)["kinds"] == ["face"]


def test_subject_reference_crops_a_real_face():
    from skimage.data import astronaut

    from multicrafter.reference_crops import subject_reference

    photo = Image.fromarray(astronaut())
    crop, note = subject_reference(photo, "face")
    assert note is None and crop.width == crop.height and crop.width < photo.width // 2
    same, note = subject_reference(photo, "object")
    assert same is photo and note is None
