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
