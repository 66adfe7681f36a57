"""ToyWorld world: identities, split, similar pairs, scenes, exact masks, prompts, the dataset writer and its CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multicrafter.errors import UserError
from multicrafter.toyworld import (
    Identity,
    build_sample,
    catalogue,
    identities,
    make_prompt,
    parse_prompt,
    render_reference,
    render_scene,
    sample_scene,
    similar_pairs,
    split_of,
    write_dataset,
)
from multicrafter.toyworld.__main__ import main as toyworld_main
from multicrafter.toyworld.render import draw_sprite
from multicrafter.toyworld.subjects import is_similar

ROOT = Path(__file__).resolve().parents[1]


def test_identities_split_and_similar_pairs():
    cat = catalogue()
    assert len(cat) >= 200 and len({i.id for i in cat}) == len(cat)
    train, test = set(identities("train")), set(identities("test"))
    assert not train & test and train | test == set(cat)
    assert 0.12 < len(test) / len(cat) < 0.28
    # the split is by identity, independent of body/accent order
    a = identities("test")[0]
    assert split_of(Identity(a.shape, a.accent, a.body, a.pattern)) == "test"
    for kind in ("colour", "pattern"):
        pairs = similar_pairs("test", kind)
        assert pairs, kind
        for x, y in pairs[:50]:
            assert x in test and y in test and is_similar(x, y, kind) and x != y
    x, y = similar_pairs("test", "colour")[0]
    assert x.shape == y.shape and x.pattern == y.pattern and set(x.colours) != set(y.colours)
    x, y = similar_pairs("test", "pattern")[0]
    assert x.shape == y.shape and set(x.colours) == set(y.colours) and x.pattern != y.pattern


def test_scene_determinism_split_and_similar_sampling():
    a, b = sample_scene(3, 5), sample_scene(3, 5)
    assert a == b and json.loads(json.dumps(a)) == a
    assert sample_scene(4, 5) != a and sample_scene(3, 6) != a
    img1, lab1 = render_scene(a)
    img2, lab2 = render_scene(b)
    assert np.array_equal(img1, img2) and np.array_equal(lab1, lab2)
    test_ids = {i.id for i in identities("test")}
    for i in range(20):
        s = sample_scene(0, i, split="test", similar="colour")
        assert all(subj["id"] in test_ids for subj in s["subjects"])
        assert s["similar"] == "colour"
        ids = [Identity.from_dict(x) for x in s["subjects"]]
        assert any(is_similar(p, q, "colour") for p in ids for q in ids if p != q)
    counts = {len(sample_scene(1, i)["subjects"]) for i in range(40)}
    assert counts == {2, 3}
    assert {len(sample_scene(1, i, n_subjects=(1, 4))["subjects"]) for i in range(20)} == {1, 4}


def test_masks_are_exactly_the_visible_pixels_with_occlusion():
    scene = sample_scene(0, 0, n_subjects=2)
    # force a heavy overlap: the second subject is drawn over the first
    scene["subjects"][1]["center"] = [scene["subjects"][0]["center"][0] + 10, scene["subjects"][0]["center"][1] + 4]
    img, labels = render_scene(scene)
    h, w = labels.shape
    alone = []
    for subj in scene["subjects"]:
        canvas = np.zeros((h, w, 3), np.uint8)
        lab = np.full((h, w), -1, np.int16)
        draw_sprite(canvas, lab, 0, Identity.from_dict(subj), tuple(subj["center"]), subj["radius"], subj["rotation"])
        alone.append(lab == 0)
    assert (alone[0] & alone[1]).sum() > 50, "the test needs a real overlap"
    assert np.array_equal(labels == 1, alone[1])
    assert np.array_equal(labels == 0, alone[0] & ~alone[1])
    # outside the subjects the image is pure background
    bg = render_scene({**scene, "subjects": []})[0]
    assert np.array_equal(img[labels == -1], bg[labels == -1])


def test_prompt_round_trip_and_vocabulary():
    for i in range(30):
        s = sample_scene(7, i, n_subjects=(1, 2, 3, 4))
        parsed = parse_prompt(s["prompt"])
        assert parsed["background"] == s["background"]
        assert [p["position"] for p in parsed["subjects"]] == [x["position"] for x in s["subjects"]]
        assert [(p["shape"], p["colours"], p["pattern"]) for p in parsed["subjects"]] == \
            [(x["shape"], x["colours"], x["pattern"]) for x in s["subjects"]]
        assert make_prompt(s) == s["prompt"]
    with pytest.raises(ValueError):
        parse_prompt("a photo of a dog")


def test_references_are_augmented_not_copies():
    s = build_sample(0, 1)
    subj = s.scene["subjects"][0]
    canonical = render_reference(subj, 64)
    assert s.references[0].shape == (64, 64, 3)
    assert not np.array_equal(s.references[0], canonical)
    views = {json.dumps(x["reference_view"]) for i in range(5) for x in build_sample(0, i).scene["subjects"]}
    assert len(views) > 5
    # the reference holds the subject's two colours and nothing of the scene background texture
    colours = {tuple(c) for c in s.references[0].reshape(-1, 3)}
    assert len(colours) == 3


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writer_format_determinism_and_masks(tmp_path):
    meta = write_dataset(tmp_path / "a", 4, seed=11, split="test")
    write_dataset(tmp_path / "b", 4, seed=11, split="test")
    write_dataset(tmp_path / "c", 4, seed=12, split="test")
    ta, tb, tc = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert ta == tb, "same seed must give byte-identical datasets"
    write_dataset(tmp_path / "p", 4, seed=11, split="test", workers=2)
    assert _tree(tmp_path / "p") == ta, "rendering in several processes must give the same bytes"
    assert ta["metadata.jsonl"] != tc["metadata.jsonl"] and ta["images/00000.png"] != tc["images/00000.png"]
    lines = [json.loads(x) for x in meta.read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        img = Image.open(tmp_path / "a" / line["file_name"])
        assert img.size == (128, 128) and line["caption"] == line["toyworld"]["prompt"]
        scene = line["toyworld"]
        _, labels = render_scene(scene)
        for k, subj in enumerate(line["subjects"]):
            assert subj["kind"] == "object" and subj["name"] == scene["subjects"][k]["name"]
            mask = np.asarray(Image.open(tmp_path / "a" / subj["mask"]))
            assert mask.dtype == np.uint8 and mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask == 255, labels == k)
            ys, xs = np.nonzero(mask)
            assert subj["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert Image.open(tmp_path / "a" / subj["reference"]).size == (64, 64)
    # the project's own dataset reader accepts it
    from multicrafter.dataset_format import load_samples

    assert len(load_samples(tmp_path / "a")) == 4
    with pytest.raises(UserError):
        write_dataset(tmp_path / "a", 2, seed=11)
    write_dataset(tmp_path / "a", 2, seed=11, overwrite=True)
    assert len((tmp_path / "a" / "metadata.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "a" / "images" / "00003.png").exists()


def test_cli_writes_dataset_and_contact_sheet(tmp_path, capsys):
    assert toyworld_main(["--out", str(tmp_path / "d"), "--n", "3", "--seed", "1", "--size", "96", "--ref-size", "48",
                          "--subjects", "1,4", "--contact-sheet", str(tmp_path / "sheet.png")]) == 0
    line = json.loads((tmp_path / "d" / "metadata.jsonl").read_text().splitlines()[0])
    assert Image.open(tmp_path / "d" / line["file_name"]).size == (96, 96)
    assert Image.open(tmp_path / "d" / line["subjects"][0]["reference"]).size == (48, 48)
    assert Image.open(tmp_path / "sheet.png").size[0] > 96
    assert "wrote 3 scenes" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--n", "2", "--size", "100"], "multiple of 16"),
    (["--n", "-1"], "--n must be"),
    (["--n", "2", "--similar-prob", "2"], "similar-prob"),
])
def test_cli_bad_input_is_one_line(tmp_path, run_main, args, message):
    r = run_main(toyworld_main, ["--out", tmp_path / "x", *args])
    assert r.code == 2
    assert r.err.strip().count("\n") == 0 and message in r.err and "Traceback" not in r.err


def test_cli_bad_input_is_one_line_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "multicrafter.toyworld", "--out", str(tmp_path / "x"), "--n", "-1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--n must be" in proc.stderr and "Traceback" not in proc.stderr
