"""The dataset format (multicrafter.dataset_format): round trip, imagefolder contract, validation, crash safety,
bad input. annotate's command lines over it are in test_annotate_dataset.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import multicrafter.dataset_format as ds
from multicrafter.dataset_format import (
    DatasetWriter,
    SubjectSpec,
    errors_of,
    load_samples,
    parse_box,
    sanitize_name,
    validate_dataset,
)
from multicrafter.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def scene(seed: int, h: int = 40, w: int = 56, n: int = 2) -> tuple[np.ndarray, list[np.ndarray]]:
    """A small image with `n` rectangles and their exact masks."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    masks = []
    for k in range(n):
        m = np.zeros((h, w), bool)
        x0, y0 = 4 + 24 * k, 6 + 3 * k
        m[y0:y0 + 14, x0:x0 + 16] = True
        img[m] = rng.integers(150, 255, 3, dtype=np.uint8)
        masks.append(m)
    return img, masks


def make_dataset(root: Path, n: int = 3) -> DatasetWriter:
    w = DatasetWriter(root)
    for i in range(n):
        img, masks = scene(i)
        subs = [SubjectSpec(f"thing {k}", m) for k, m in enumerate(masks)]
        w.add_sample(img, f"caption {i}", subs, extra={"toyworld": {"seed": i, "layout": ["left", "right"]}})
    return w


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- round trip and contract
def test_round_trip_identical(tmp_path):
    w = DatasetWriter(tmp_path / "ds")
    written = []
    for i in range(3):
        img, masks = scene(i)
        ref = Image.new("RGB", (20, 20), (i * 40, 10, 200))
        subs = [SubjectSpec("left one", masks[0], kind="face" if i == 1 else "object", reference=ref,
                            extra={"note": f"n{i}"}),
                SubjectSpec("right one", masks[1], box=[28, 9, 44, 23])]
        written.append((img, masks, ref, w.add_sample(img, f"a caption {i}", subs, extra={"toyworld": {"i": i}})))
    samples = load_samples(tmp_path / "ds")
    assert [s.name for s in samples] == ["0001", "0002", "0003"]
    for (img, masks, ref, added), s in zip(written, samples):
        assert s.record == added.record
        assert np.array_equal(np.asarray(Image.open(s.image)), img)
        assert s.caption == added.caption and s.extra == {"toyworld": {"i": s.line - 1}}
        assert [sub.name for sub in s.subjects] == ["left one", "right one"]
        assert s.subjects[0].kind == ("face" if s.line == 2 else "object")
        assert s.subjects[0].extra == {"note": f"n{s.line - 1}"}
        assert s.subjects[1].box == [28, 9, 44, 23]
        assert s.subjects[0].box == [4, 6, 20, 20]  # from the mask: exclusive x1/y1
        for sub, m in zip(s.subjects, masks):
            arr = np.asarray(Image.open(sub.mask))
            assert arr.dtype == np.uint8 and np.array_equal(arr >= 128, m) and set(np.unique(arr)) <= {0, 255}
            assert np.array_equal(sub.load_mask(), m)
        assert np.array_equal(np.asarray(Image.open(s.subjects[0].reference)), np.asarray(ref))


def test_rewrite_preserves_foreign_lines_and_extra_keys(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, n=1)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    # a line written by another tool: different key order, extra keys at both levels
    foreign = {"toyworld": {"scene": [1, 2]}, "subjects": [dict(rec["subjects"][0], score=0.5)],
               "caption": "x", "file_name": rec["file_name"]}
    foreign["subjects"][0]["box"] = None
    (root / "metadata.jsonl").write_text(json.dumps(foreign) + "\n")
    foreign_line = (root / "metadata.jsonl").read_text().splitlines()[0]
    w = DatasetWriter(root)
    img, masks = scene(7)
    w.add_sample(img, "new", [SubjectSpec("a", masks[0])])
    w.update_sample("0002", caption="newer")
    out = (root / "metadata.jsonl").read_text().splitlines()
    assert out[0] == foreign_line
    assert json.loads(out[1])["caption"] == "newer"
    assert not errors_of(validate_dataset(root))


def test_imagefolder_metadata_contract(tmp_path):
    """What datasets' imagefolder needs (datasets is not installed): checked here independently of validate."""
    root = tmp_path / "ds"
    make_dataset(root)
    meta = root / "metadata.jsonl"
    assert meta.is_file() and meta.parent == root
    rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and len({r["file_name"] for r in rows}) == 3
    keys = {tuple(sorted(r)) for r in rows}
    assert len(keys) == 1  # one table schema
    for r in rows:
        fn = r["file_name"]
        assert not fn.startswith("/") and ".." not in fn.split("/") and "\\" not in fn
        assert (root / fn).is_file()
        Image.open(root / fn).verify()
        for s in r["subjects"]:
            assert sorted(s) == ["box", "kind", "mask", "name", "reference"]  # same struct fields on every line
            assert (root / s["mask"]).is_file() and (root / s["reference"]).is_file()


# ---------------------------------------------------------------- validation
def break_dataset(root: Path) -> dict[int, str]:
    """Write 9 lines, one problem each on lines 2-9; returns {line: expected message fragment}."""
    w = make_dataset(root, n=8)
    recs = [dict(r) for r in w.records]
    (root / recs[1]["file_name"]).unlink()
    Image.new("L", (10, 10), 255).save(root / recs[2]["subjects"][0]["mask"])
    Image.new("L", (56, 40), 0).save(root / recs[3]["subjects"][0]["mask"])
    recs[5]["subjects"][1] = dict(recs[5]["subjects"][1], name=recs[5]["subjects"][0]["name"])
    recs[6]["file_name"] = "../outside.png"
    Image.new("RGB", (56, 40)).save(root / recs[7]["subjects"][1]["mask"])
    recs.append(dict(recs[0]))
    lines = [json.dumps(r) for r in recs]
    lines[4] = '{"file_name": "images/0005.png", "caption": '
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {2: "image file missing", 3: "differs from image size", 4: "mask is empty", 5: "bad JSON",
            6: "duplicate subject name", 7: "must not contain '..'", 8: "8-bit single-channel",
            9: "duplicate file_name"}


def test_validate_reports_each_problem_with_line(tmp_path):
    root = tmp_path / "broken"
    expected = break_dataset(root)
    problems = validate_dataset(root)
    errors = errors_of(problems)
    for line, fragment in expected.items():
        assert any(p.line == line and fragment in p.message for p in errors), (line, fragment, errors)
    assert not any(p.line == 1 for p in errors)
    assert all("\n" not in str(p) for p in problems)  # each problem prints as one line
    assert any(str(p).startswith("metadata.jsonl:3: error: subject 0 (thing 0): mask size 10x10 differs")
               for p in errors)
    with pytest.raises(UserError, match="error") as info:
        load_samples(root)
    assert "\n" not in str(info.value) and "python -m annotate.validate" in str(info.value)


def test_validate_passes_valid_dataset(tmp_path):
    root = tmp_path / "ok"
    make_dataset(root)
    (root / "masks" / "stray_0.png").write_bytes(b"left by an interrupted save")
    first = load_samples(root)[0].subjects[0]
    Image.fromarray(first.load_mask().astype(np.uint8)).save(first.mask)  # a 0/1 mask: readable, but flagged
    problems = validate_dataset(root)
    assert not errors_of(problems)
    assert any(p.severity == "warning" and "stray_0.png" in p.message for p in problems)
    assert any(p.line == 1 and "0/1" in p.message for p in problems)
    assert load_samples(root)[0].subjects[0].load_mask().sum() == 14 * 16


def test_validate_toyworld_output_if_available(tmp_path):
    """ToyWorld's CLI writes a dataset in the format: it validates, and the sample writer can edit it."""
    res = subprocess.run([sys.executable, "-m", "multicrafter.toyworld", "--out", str(tmp_path / "tw"), "--n", "4",
                          "--seed", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    errors = errors_of(validate_dataset(tmp_path / "tw"))
    assert not errors, errors
    samples = load_samples(tmp_path / "tw")
    assert len(samples) == 4 and all(s.subjects and "toyworld" in s.extra for s in samples)
    lines = (tmp_path / "tw" / "metadata.jsonl").read_text().splitlines()
    DatasetWriter(tmp_path / "tw").update_sample(samples[1].name, caption="edited")  # our writer on their output
    after = (tmp_path / "tw" / "metadata.jsonl").read_text().splitlines()
    assert [after[0], after[2], after[3]] == [lines[0], lines[2], lines[3]]
    assert json.loads(after[1])["toyworld"] == samples[1].extra["toyworld"]
    assert not errors_of(validate_dataset(tmp_path / "tw"))


# ---------------------------------------------------------------- names and bad input
def test_sanitize_and_no_path_traversal(tmp_path):
    assert sanitize_name("../../etc/passwd") == "etc_passwd"
    assert sanitize_name("My photo (1).jpg") == "My_photo_1_jpg"
    with pytest.raises(UserError):
        sanitize_name("../..")
    w = DatasetWriter(tmp_path / "ds")
    img, masks = scene(0)
    s = w.add_sample(img, "c", [SubjectSpec("a", masks[0])], name="../../evil")
    assert s.image.parent == (tmp_path / "ds" / "images").resolve()
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("case", ["corrupt", "huge", "too_wide", "mask_size", "empty_mask", "dup_subject", "bad_kind",
                                  "dup_sample", "box_outside", "box_negative", "box_nan", "box_inf", "box_text",
                                  "subject_extra_numpy", "subject_extra_object"])
def test_bad_input_writes_nothing(tmp_path, case):
    root = tmp_path / "ds"
    w = make_dataset(root, n=1)
    before = snapshot(root)
    img, masks = scene(1)
    subs = [SubjectSpec("a", masks[0])]
    kwargs = {}
    if case == "corrupt":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        img = bad
    elif case == "huge":
        img = tmp_path / "huge.png"
        Image.new("1", (9000, 8000)).save(img)  # 72 MP: refused before decoding
    elif case == "too_wide":
        img = np.zeros((8, 5000, 3), np.uint8)
        subs = [SubjectSpec("a", np.ones((8, 5000), bool))]
    elif case == "mask_size":
        subs = [SubjectSpec("a", np.ones((10, 10), bool))]
    elif case == "empty_mask":
        subs = [SubjectSpec("a", np.zeros_like(masks[0]))]
    elif case == "dup_subject":
        subs = [SubjectSpec("a", masks[0]), SubjectSpec("a", masks[1])]
    elif case == "bad_kind":
        subs = [SubjectSpec("a", masks[0], kind="person")]
    elif case == "dup_sample":
        kwargs = {"name": "0001"}
    elif case.startswith("box_"):   # the image is 56x40
        box = {"box_outside": [4, 6, 57, 20], "box_negative": [-1, 6, 20, 20], "box_nan": [4, 6, float("nan"), 20],
               "box_inf": [4, 6, 20, float("inf")], "box_text": [4, 6, "20", 20]}[case]
        subs = [SubjectSpec("a", masks[0]), SubjectSpec("b", masks[1], box=box)]
    elif case == "subject_extra_numpy":
        subs = [SubjectSpec("a", masks[0], extra={"score": np.int64(3)})]
    elif case == "subject_extra_object":
        subs = [SubjectSpec("a", masks[0], extra={"tags": {"x", "y"}})]
    with pytest.raises(UserError) as info:
        w.add_sample(img, "c", subs, **kwargs)
    assert str(info.value) and "\n" not in str(info.value)
    assert snapshot(root) == before


def test_numpy_box_is_stored_as_plain_floats(tmp_path):
    w = DatasetWriter(tmp_path / "ds")
    img, masks = scene(0)
    box = np.array([4, 6, 20, 20], dtype=np.int64)
    s = w.add_sample(img, "c", [SubjectSpec("a", masks[0], box=list(box)), SubjectSpec("b", masks[1], box=box)])
    assert s.subjects[0].box == s.subjects[1].box == [4.0, 6.0, 20.0, 20.0]
    assert all(type(v) is float for v in s.record["subjects"][1]["box"])
    assert not errors_of(validate_dataset(tmp_path / "ds"))


def test_validator_uses_the_writers_box_rule(tmp_path):
    """The validator and the writer share parse_box: a hand-edited box fails the same way."""
    root = tmp_path / "ds"
    make_dataset(root, n=1)
    meta = root / "metadata.jsonl"
    for bad, fragment in [("[0, 0, NaN, 5]", "finite"), ("[0, 0, Infinity, 5]", "finite"),
                          ("[-1, 0, 5, 5]", "outside the 56x40 image"), ("[0, 0, 57, 5]", "outside"),
                          ("[5, 0, 5, 5]", "x0 < x1"), ('[0, 0, "5", 5]', "four numbers")]:
        rec = json.loads(meta.read_text().splitlines()[0])
        rec["subjects"][0]["box"] = "BOX"
        meta.write_text(json.dumps(rec).replace('"BOX"', bad) + "\n")
        errs = errors_of(validate_dataset(root))
        assert len(errs) == 1 and fragment in errs[0].message and errs[0].line == 1, (bad, errs)
        with pytest.raises(ValueError, match=fragment):
            parse_box(json.loads(bad), (56, 40))
    assert parse_box([0, 0, 56, 40], (56, 40)) == [0.0, 0.0, 56.0, 40.0]   # edges are inside (x1/y1 exclusive)


def test_update_and_delete(tmp_path):
    root = tmp_path / "ds"
    w = make_dataset(root, n=3)
    img, masks = scene(1)
    s = w.update_sample("0002", subjects=[SubjectSpec("only", masks[1])])
    assert [x.name for x in s.subjects] == ["only"]
    assert np.array_equal(np.asarray(Image.open(s.subjects[0].mask)) > 0, masks[1])
    w.delete_sample("0001")
    samples = load_samples(root)
    assert [x.name for x in samples] == ["0002", "0003"]
    assert not (root / "images" / "0001.png").exists()
    assert not [p for p in validate_dataset(root)]  # no orphans left behind
    with pytest.raises(UserError, match="no sample named"):
        w.delete_sample("0001")


# ---------------------------------------------------------------- crash safety
_CHILD = """
import os, sys, numpy as np
sys.path.insert(0, {repo!r})
import multicrafter.dataset_format as ds
root, stage = sys.argv[1], sys.argv[2]
w = ds.DatasetWriter(root)
img = np.full((40, 56, 3), 90, np.uint8); m = np.zeros((40, 56), bool); m[5:20, 5:30] = True
if stage == "loop":
    i = 0
    while True:
        w.add_sample(img, f"loop {{i}}", [ds.SubjectSpec("a", m), ds.SubjectSpec("b", ~m)]); i += 1
        print(i, flush=True)
ds.FAULT_HOOK = lambda rel: os._exit(9) if rel == stage else None
if stage.startswith("masks/0001"):
    w.update_sample("0001", subjects=[ds.SubjectSpec("new", m)])
else:
    w.add_sample(img, "third", [ds.SubjectSpec("a", m), ds.SubjectSpec("b", ~m)])
"""


@pytest.mark.parametrize("stage", ["images/0003.png", "masks/0003_1.png", "refs/0003_1.png", "masks/0001_0_v2.png"])
def test_killed_mid_save_keeps_dataset_valid(tmp_path, stage):
    root = tmp_path / "ds"
    make_dataset(root, n=2)
    before_meta = (root / "metadata.jsonl").read_bytes()
    before = load_samples(root)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO)))
    res = subprocess.run([sys.executable, str(script), str(root), stage], capture_output=True, text=True)
    assert res.returncode == 9, res.stderr  # it really died at that point
    assert (root / stage).exists()  # ...after writing that file
    assert (root / "metadata.jsonl").read_bytes() == before_meta
    problems = validate_dataset(root)
    assert not errors_of(problems) and problems  # orphans reported as warnings
    after = load_samples(root)
    assert [s.record for s in after] == [s.record for s in before]


def test_sigkill_during_save_loop(tmp_path):
    """Kill a writer at an arbitrary moment (several times): every surviving line is complete and valid."""
    root = tmp_path / "ds"
    make_dataset(root, n=1)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO)))
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(root), "loop"], stdout=subprocess.PIPE, text=True)
        for _ in range(3):  # let it finish a few saves, then kill it somewhere inside the next one
            proc.stdout.readline()
        time.sleep(0.01)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        assert not errors_of(validate_dataset(root))
    samples = load_samples(root)
    assert len(samples) >= 7 and samples[0].caption == "caption 0"


def test_injected_failure_leaves_previous_state(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    w = make_dataset(root, n=2)
    before = (root / "metadata.jsonl").read_bytes()

    def boom(rel):
        if rel.startswith("refs/"):
            raise OSError("disk full")

    monkeypatch.setattr(ds, "FAULT_HOOK", boom)
    img, masks = scene(3)
    with pytest.raises(OSError):
        w.add_sample(img, "c", [SubjectSpec("a", masks[0])])
    with pytest.raises(OSError):
        w.update_sample("0001", subjects=[SubjectSpec("z", masks[1])])
    assert (root / "metadata.jsonl").read_bytes() == before
    assert len(load_samples(root)) == 2 and not errors_of(validate_dataset(root))
    monkeypatch.setattr(ds, "FAULT_HOOK", None)
    w2 = DatasetWriter(root)  # a fresh writer over the leftovers works and overwrites the orphans
    w2.add_sample(img, "c", [SubjectSpec("a", masks[0])])
    assert not errors_of(validate_dataset(root))
    assert len(load_samples(root)) == 3


# ---------------------------------------------------------------- the module's contract, end to end
def test_write_read_validate_round_trip_with_the_layout(tmp_path):
    root = tmp_path / "ds"
    img, masks = scene(4)
    ref = Image.new("RGB", (24, 24), (10, 200, 30))
    w = DatasetWriter(root)
    w.add_sample(img, "two things", [SubjectSpec("a", masks[0], kind="face", reference=ref),
                                     SubjectSpec("b", masks[1])], name="first one")
    w.add_sample(img, "no subjects yet", [])
    assert validate_dataset(root) == []   # not even a warning
    first, second = load_samples(root)
    assert first.name == "first_one" and second.name == "0001"
    assert first.record["file_name"] == ds.image_file("first_one")
    assert [(s.mask, s.reference) for s in first.subjects] == [
        ((root / ds.mask_file("first_one", k)).resolve(), (root / ds.reference_file("first_one", k)).resolve())
        for k in range(2)]
    for sub, m in zip(first.subjects, masks):
        with Image.open(sub.mask) as im:
            assert im.mode == "L" and im.size == (56, 40)
        assert np.array_equal(sub.load_mask(), m)
    assert np.array_equal(np.asarray(first.subjects[0].load_reference()), np.asarray(ref))
    assert first.subjects[1].box == [28.0, 9.0, 44.0, 23.0]
    assert second.subjects == [] and second.caption == "no subjects yet"
    assert np.array_equal(np.asarray(second.load_image()), img)


@pytest.mark.parametrize("failing_call", [1, 6])   # files in order: image, mask, ref, mask, ref, metadata.jsonl
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, failing_call):
    """A write that fails half-way (here: the disk fails after the bytes went into the temp file) leaves no temp
    file, no truncated file, and the previous metadata.jsonl byte for byte."""
    root = tmp_path / "ds"
    make_dataset(root, n=1)
    before = snapshot(root)
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError("no space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    img, masks = scene(2)
    with pytest.raises(OSError, match="no space"):
        DatasetWriter(root).add_sample(img, "c", [SubjectSpec("a", masks[0]), SubjectSpec("b", masks[1])])
    monkeypatch.setattr(os, "fsync", real_fsync)
    after = snapshot(root)
    assert after["metadata.jsonl"] == before["metadata.jsonl"]
    assert not [p for p in after if p.endswith(".tmp") or Path(p).name.startswith(".")]
    for rel in set(after) - set(before):    # files written before the failure are whole images (orphans)
        Image.open(root / rel).verify()
    if failing_call == 1:
        assert after == before
    problems = validate_dataset(root)
    assert not errors_of(problems) and len(load_samples(root)) == 1
    assert all(p.severity == "warning" for p in problems)


def test_new_dataset_is_swapped_in_whole_or_not_at_all(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, n=1)
    before = snapshot(root)
    with pytest.raises(RuntimeError, match="interrupted"):
        with ds.new_dataset(root, overwrite=True) as tmp:
            ds.save_mask(np.ones((4, 4), bool), tmp / ds.mask_file("x", 0))
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="no metadata.jsonl was written"):
        with ds.new_dataset(root, overwrite=True) as tmp:
            ds.save_mask(np.ones((4, 4), bool), tmp / ds.mask_file("x", 0))
    assert snapshot(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(UserError, match="pass --overwrite"):
        with ds.new_dataset(root):
            pass
    img = Image.new("RGB", (8, 8))
    with ds.new_dataset(root, overwrite=True) as tmp:
        (tmp / "images").mkdir()
        img.save(tmp / ds.image_file("x"))
        ds.write_metadata(tmp, [{"file_name": ds.image_file("x"), "caption": "", "subjects": []}])
    assert [s.name for s in load_samples(root)] == ["x"] and not (root / "masks").exists()


def test_validator_reports_a_mask_of_the_wrong_size_in_one_line(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, n=2)
    rec = json.loads((root / "metadata.jsonl").read_text().splitlines()[1])
    Image.new("L", (28, 20), 255).save(root / rec["subjects"][1]["mask"])
    problems = validate_dataset(root)
    assert [str(p) for p in problems] == [
        "metadata.jsonl:2: error: subject 1 (thing 1): mask size 28x20 differs from image size 56x40"]
    with pytest.raises(UserError) as info:
        load_samples(root)
    assert "\n" not in str(info.value) and "mask size 28x20" in str(info.value)
