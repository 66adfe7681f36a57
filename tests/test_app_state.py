"""ModelHolder.adapter_choices: the pipeline's own list once loaded, the model folder's before."""

from __future__ import annotations

from types import SimpleNamespace

from demo.state import FOLDER_ADAPTER, NO_ADAPTER, ModelHolder


def test_adapter_choices_before_and_after_loading(tmp_path):
    (tmp_path / "adapters" / "ippo").mkdir(parents=True)
    (tmp_path / "adapters" / "base").mkdir()
    (tmp_path / "adapters" / "notes.txt").write_text("not an adapter")
    holder = ModelHolder(str(tmp_path))
    assert holder.adapter_choices() == [NO_ADAPTER, "base", "ippo", FOLDER_ADAPTER]
    assert holder.default_adapter() == "ippo"
    holder._pipe = SimpleNamespace(available_adapters=lambda: ["from-pipeline"])   # loaded: the pipeline decides
    assert holder.adapter_choices() == [NO_ADAPTER, "from-pipeline", FOLDER_ADAPTER]
    assert ModelHolder(str(tmp_path / "missing")).adapter_choices() == [NO_ADAPTER, FOLDER_ADAPTER]


def test_defaults_report_the_model_folders_true_cfg(tmp_path):
    """The toy folder asks for true CFG 3 (its multicrafter_sampling.json); a folder without it, and tiny, for none."""
    import json

    assert ModelHolder("toy").defaults()["true_cfg"] == 3.0
    assert ModelHolder("tiny").defaults()["true_cfg"] == 1.0
    assert ModelHolder(str(tmp_path)).defaults()["true_cfg"] == 1.0
    (tmp_path / "multicrafter_sampling.json").write_text(json.dumps({"true_cfg_scale": 2.5, "negative_prompt": ""}))
    assert ModelHolder(str(tmp_path)).defaults()["true_cfg"] == 2.5


def test_defaults_give_the_generate_tabs_starting_values(tmp_path):
    """Negative prompt and reference sizes come from the model folder (its sampling and reference files), with
    UNO's 512 / 320 px when a folder (or a hub id not loaded yet) says nothing."""
    import json

    toy = ModelHolder("toy").defaults()
    assert toy["negative_prompt"] == "" and toy["reference_sizes"] == (64, 64)
    assert ModelHolder("tiny").defaults()["reference_sizes"] == (64, 48)
    assert ModelHolder("black-forest-labs/FLUX.1-dev").defaults()["reference_sizes"] == (512, 320)
    (tmp_path / "multicrafter_sampling.json").write_text(json.dumps({"true_cfg_scale": 2.0,
                                                                     "negative_prompt": "blurry"}))
    (tmp_path / "multicrafter_references.json").write_text(json.dumps({"long_side_single": 384,
                                                                       "long_side_multi": 256}))
    d = ModelHolder(str(tmp_path)).defaults()
    assert d["negative_prompt"] == "blurry" and d["reference_sizes"] == (384, 256)
    (tmp_path / "multicrafter_references.json").write_text("{broken")
    assert ModelHolder(str(tmp_path)).defaults()["reference_sizes"] == (512, 320)   # reported when it loads


def test_the_header_names_a_hub_id_or_folder_adapter_not_the_dropdown_placeholder():
    from demo import _adapter_label

    assert _adapter_label(ModelHolder("tiny", "someone/uno-lora")) == "someone/uno-lora"
    assert _adapter_label(ModelHolder("toy", "attn")) == "attn"
    assert _adapter_label(ModelHolder("toy")) == "ippo"   # the toy model's own default
