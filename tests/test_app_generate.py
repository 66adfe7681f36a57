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


def _png(path):
    return np.asarray(Image.open(path))


def test_reference_long_side_default_is_the_models_and_a_value_replaces_it(holder, inputs, tmp_path):
    refs = [(r, None) for r in inputs["refs"]]
    _, _, auto, notes = generate_tab.generate(holder, tmp_path, refs, ["a", "b"], [], "p", 0, STEPS, 3.5, SIZE, SIZE,
                                              NO_ADAPTER, None)
    assert auto["reference_long_side"] == holder.defaults()["reference_sizes"][1] == 48   # tiny, several refs
    assert "references at 48 px" in notes
    path, _, small, _ = generate_tab.generate(holder, tmp_path, refs, ["a", "b"], [], "p", 0, STEPS, 3.5, SIZE,
                                              SIZE, NO_ADAPTER, None, reference_long_side=32)
    assert small["reference_long_side"] == 32 and read_generation_params(path)["reference_long_side"] == 32
    assert not np.array_equal(_png(path), _png(_gen(holder, tmp_path, inputs["refs"], prompt="p")[0]))


def test_negative_prompt_is_used_with_true_cfg_only(holder, inputs, tmp_path):
    def run(**kw):
        path, _, params, notes = generate_tab.generate(holder, tmp_path, [(r, None) for r in inputs["refs"]], [],
                                                       [], "two shapes", 5, STEPS, 3.5, SIZE, SIZE, NO_ADAPTER, None,
                                                       **kw)
        return _png(path), params, notes

    plain, p0, _ = run()
    assert p0["true_cfg_scale"] == 1.0 and "negative_prompt" not in p0        # tiny: no true CFG by default
    ignored, _, notes = run(negative_prompt="blurry")
    assert np.array_equal(plain, ignored) and "negative prompt was not used" in notes
    cfg_empty, p1, _ = run(true_cfg=2.0)
    cfg_neg, p2, notes2 = run(true_cfg=2.0, negative_prompt="blurry")
    assert p1["true_cfg_scale"] == 2.0 and p1["negative_prompt"] == "" and p2["negative_prompt"] == "blurry"
    assert "true CFG 2" in notes2
    assert not np.array_equal(plain, cfg_empty) and not np.array_equal(cfg_empty, cfg_neg)


def test_true_cfg_defaults_to_the_models_own(inputs, tmp_path, monkeypatch):
    """The toy asks for true CFG 3 against the empty prompt; left out, the tab uses (and records) exactly that."""
    holder = ModelHolder("tiny")
    monkeypatch.setattr(holder, "defaults", lambda: dict(ModelHolder("tiny").defaults(), true_cfg=3.0))
    seen = {}
    monkeypatch.setattr(generate_tab, "run_pipeline",
                        lambda *a, **kw: seen.update(kw) or (_FakeOut(), None))
    _, _, params, _ = generate_tab.generate(holder, tmp_path, [(inputs["refs"][0], None)], [], [], "p", 0, STEPS,
                                            3.5, SIZE, SIZE, NO_ADAPTER, None)
    assert seen["true_cfg"] == 3.0 and seen["negative_prompt"] == "" and seen["reference_long_side"] is None
    assert params["true_cfg_scale"] == 3.0 and params["negative_prompt"] == ""


class _FakeOut:
    images = [Image.new("RGB", (SIZE, SIZE))]
    reference_images = [Image.new("RGB", (48, 32))]


def test_randomize_seed_draws_one_and_reports_it(holder, inputs, tmp_path, monkeypatch):
    real_draw, drawn = generate_tab.draw_seed, iter([123456, 77])
    assert 0 <= real_draw() <= generate_tab.MAX_SEED
    monkeypatch.setattr(generate_tab, "draw_seed", lambda: next(drawn))
    path, _, params, notes = _gen_random(holder, inputs, tmp_path)
    assert params["seed"] == 123456 == read_generation_params(path)["seed"]
    assert "Seed **123456** (drawn at random)" in notes
    again = _gen(holder, tmp_path, inputs["refs"], seed=123456)[0]         # the reported seed reproduces the image
    assert np.array_equal(_png(path), _png(again))
    assert _gen_random(holder, inputs, tmp_path)[2]["seed"] == 77


def _gen_random(holder, inputs, tmp_path):
    return generate_tab.generate(holder, tmp_path, [(r, None) for r in inputs["refs"]], ["alpha", "beta"],
                                 ["object", "object"], "two shapes", 999, STEPS, 3.5, SIZE, SIZE, NO_ADAPTER, None,
                                 randomize_seed=True)


@pytest.mark.parametrize("kw,message", [
    (dict(reference_long_side=8), "reference long side must be 0"),
    (dict(reference_long_side=5000), "16 to 1024"),
    (dict(reference_long_side="big"), "reference long side must be a number"),
    (dict(true_cfg=0.5), "true CFG scale must be at least 1"),
    (dict(seed=-1), "seed must be a whole number"),
    (dict(seed=1.5), "seed must be a whole number"),
])
def test_new_controls_refuse_bad_values_in_one_line(holder, inputs, tmp_path, kw, message):
    seed = kw.pop("seed", 0)
    with pytest.raises(UserError, match=message) as err:
        generate_tab.generate(holder, tmp_path / "out", [(r, None) for r in inputs["refs"]], [], [], "p", seed, STEPS,
                              3.5, SIZE, SIZE, NO_ADAPTER, None, **kw)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_gpu_seconds_grows_with_the_work_and_stays_in_zerogpu_range():
    base = generate_tab.gpu_seconds(28, 1024, 1024, 2)
    assert 30 <= base <= 300
    assert generate_tab.gpu_seconds(50, 1024, 1024, 2) > base                  # steps
    assert generate_tab.gpu_seconds(28, 1024, 1024, 4) > base                  # references
    assert generate_tab.gpu_seconds(28, 1024, 1024, 2, reference_long_side=1024) > base
    assert generate_tab.gpu_seconds(28, 1024, 1024, 2, true_cfg=3.0) > base   # two passes per step
    assert generate_tab.gpu_seconds(28, 1024, 768, 2) < base                    # pixels
    assert generate_tab.gpu_seconds(2, 128, 128, 1) == 30                      # tiny/toy work: the floor
    assert generate_tab.gpu_seconds(100, 1536, 1536, 4, 1024, 10.0) == 300    # the ceiling
    assert generate_tab.gpu_seconds("?", None, 1024, 1) == generate_tab.gpu_seconds(generate_tab.MAX_STEPS, 1536,
                                                                                   1024, 1)   # unreadable: largest
    refs = [("a.png", None), ("b.png", None)]
    handler_args = ["n1", "n2", "", "", "object", "object", "object", "object", "p", 0, 28, 3.5, 1024, 1024, "none",
                    ""]
    assert generate_tab.generate_gpu_seconds(refs, *handler_args) == base
    assert generate_tab.generate_gpu_seconds(refs, *handler_args, 0, "", 3.0, False) == \
        generate_tab.gpu_seconds(28, 1024, 1024, 2, true_cfg=3.0)


def test_the_app_asks_zerogpu_for_a_duration_per_request(monkeypatch, tmp_path):
    """With `spaces` present the Generate handler is wrapped in spaces.GPU(duration=<function of its arguments>)."""
    import demo

    calls = []

    def fake_gpu(duration=120):
        calls.append(duration)
        return lambda fn: fn

    monkeypatch.setattr(demo, "gpu_decorator", fake_gpu)
    demo.build_app(ModelHolder("tiny"), config=demo.AppConfig(model="tiny", output_dir=tmp_path, data_dir=tmp_path,
                                                                 runs_dir=tmp_path))
    assert generate_tab.generate_gpu_seconds in calls
    assert all(callable(c) or 30 <= c <= 300 for c in calls)
