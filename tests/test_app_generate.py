"""Generate and Attention tab handlers on the tiny model (called directly, no server)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from demo import attention_tab, generate_tab
from demo.inputs import collect_references
from demo.state import FOLDER_ADAPTER, NO_ADAPTER, ModelHolder, resolve_model
from multicrafter.errors import UserError
from multicrafter.generation_params import read_generation_params
from tests.app_fixtures import SIZE, STEPS, corrupt_png, random_adapter, toy_refs


@pytest.fixture(scope="module")
def holder():
    return ModelHolder("tiny")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    refs, masks, prompt = toy_refs(d)
    return dict(refs=refs, masks=masks, prompt=prompt, adapter=str(random_adapter(d / "adapter")), dir=d)


def _gen(holder, out, refs, prompt="two shapes", adapter=NO_ADAPTER, folder=None, seed=0):
    return generate_tab.generate(holder, out, [(r, None) for r in refs], ["alpha", "beta"], ["object", "object"],
                                 prompt, seed, STEPS, 3.5, SIZE, SIZE, adapter, folder)


def test_generate_writes_png_with_parameters(holder, inputs, tmp_path):
    path, download, params, notes = _gen(holder, tmp_path, inputs["refs"], inputs["prompt"], seed=3)
    assert path == download and Image.open(path).size == (SIZE, SIZE)
    meta = read_generation_params(path)
    assert meta["prompt"] == inputs["prompt"] and meta["seed"] == 3 and meta["num_inference_steps"] == STEPS
    assert [s["name"] for s in meta["subjects"]] == ["alpha", "beta"]
    assert meta == params and "Saved" in notes


def test_generate_is_reproducible_and_the_adapter_changes_it(holder, inputs, tmp_path):
    a = np.asarray(Image.open(_gen(holder, tmp_path, inputs["refs"])[0]))
    b = np.asarray(Image.open(_gen(holder, tmp_path, inputs["refs"])[0]))
    c_path, _, params, _ = _gen(holder, tmp_path, inputs["refs"], adapter=FOLDER_ADAPTER, folder=inputs["adapter"])
    assert np.array_equal(a, b)
    assert params["adapter"] == inputs["adapter"]
    assert not np.array_equal(a, np.asarray(Image.open(c_path)))


@pytest.mark.parametrize("case", ["none", "five", "corrupt", "prompt", "size", "folder"])
def test_generate_bad_inputs_are_one_line_user_errors(holder, inputs, tmp_path, case):
    refs, prompt, adapter, folder, height = inputs["refs"], "p", NO_ADAPTER, None, SIZE
    if case == "none":
        refs = []
    elif case == "five":
        refs = refs * 3
    elif case == "corrupt":
        refs = [corrupt_png(tmp_path / "bad.png")]
    elif case == "prompt":
        prompt = "   "
    elif case == "size":
        height = 70
    elif case == "folder":
        adapter, folder = FOLDER_ADAPTER, str(tmp_path / "nope")
    with pytest.raises(UserError) as err:
        generate_tab.generate(holder, tmp_path / "out", [(r, None) for r in refs], [], [], prompt, 0, STEPS, 3.5,
                              height, SIZE, adapter, folder)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_huge_reference_is_downscaled_with_a_note(tmp_path, monkeypatch):
    import demo.inputs as inputs

    monkeypatch.setattr(inputs, "MAX_INPUT_SIDE", 64)
    p = tmp_path / "big.png"
    Image.new("RGB", (300, 150), (10, 200, 30)).save(p)
    images, names, kinds, notes = collect_references([(str(p), "cap")], [None], [None])
    assert images[0].size == (64, 32) and names == ["cap"] and kinds == ["object"]
    assert "300x150" in notes[0]


def test_toy_falls_back_to_tiny_with_a_note(monkeypatch, tmp_path):
    from multicrafter import presets

    monkeypatch.setattr(presets, "TOY_DIR", tmp_path / "no-toy")
    name, note = resolve_model("toy")
    assert name == "tiny" and "fell back to 'tiny'" in note and "\n" not in note
    assert resolve_model("tiny") == ("tiny", "")


def test_attention_maps_bleeding_and_adapter_off(holder, inputs, tmp_path):
    st = attention_tab.run_attention(holder, tmp_path, [(r, None) for r in inputs["refs"]], ["a", "b"], [], "p", 0,
                                     STEPS, 3.5, SIZE, SIZE, FOLDER_ADAPTER, inputs["adapter"], masks=inputs["masks"])
    assert st["on"]["overall"].shape == (2, SIZE // 16, SIZE // 16)
    assert st["on"]["per_step"].shape[0] == STEPS and st["off"] is not None
    fig_on, fig_off, rows, summary = attention_tab.render_view(st)
    assert fig_on is not None and fig_off is not None and len(rows) == 2
    assert summary["region_source"] == "mask" and set(summary["with_adapter"]["bleeding"]) == {"a", "b"}
    assert all(0.0 <= r[1] <= 1.0 and 0.0 <= r[2] <= 1.0 for r in rows)
    blocks = sorted(st["on"]["per_block"])
    _, _, _, s_block = attention_tab.render_view(st, str(blocks[-1]), 0)
    _, _, _, s_step = attention_tab.render_view(st, attention_tab.ALL, STEPS)
    assert "block" in s_block["view"] and f"step {STEPS}" in s_step["view"]
    assert s_step["with_adapter"]["maps"] != summary["with_adapter"]["maps"]
    with pytest.raises(UserError):
        attention_tab.render_view(st, attention_tab.ALL, STEPS + 1)


def test_attention_without_adapter_says_there_is_nothing_to_compare(holder, inputs, tmp_path):
    st = attention_tab.run_attention(holder, tmp_path, [(r, None) for r in inputs["refs"][:1]], [], [], "p", 0,
                                     STEPS, 3.5, SIZE, SIZE, NO_ADAPTER, None)
    _, fig_off, rows, summary = attention_tab.render_view(st)
    assert fig_off is None and summary["region_source"] == "map" and len(rows) == 1
    assert any("No adapter" in n for n in summary["notes"])
    with pytest.raises(UserError, match="masks"):
        attention_tab.run_attention(holder, tmp_path, [(r, None) for r in inputs["refs"]], [], [], "p", 0, STEPS,
                                    3.5, SIZE, SIZE, NO_ADAPTER, None, masks=inputs["masks"][:1])
