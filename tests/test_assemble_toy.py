"""Assembling the embedded toy model: pipeline + named adapters, loadable as `toy`, within the size budget."""

import json

import pytest
import torch

import multicrafter.presets as presets
from multicrafter import MultiCrafterPipeline
from multicrafter.adapters import AdapterConfig, add_adapter, save_adapter
from multicrafter.errors import UserError
from train.assemble_toy import assemble, folder_bytes, main, set_true_cfg


@pytest.fixture()
def parts(tmp_path):
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    pipe.save_pretrained(tmp_path / "base")
    adapters = {}
    for i, name in enumerate(("attn_moe", "ippo")):
        t = MultiCrafterPipeline.from_pretrained("tiny").transformer
        add_adapter(t, AdapterConfig(lora_rank=2, lora_alpha=2.0))
        with torch.no_grad():
            for n, p in t.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01 * (i + 1))
        adapters[name] = save_adapter(t, tmp_path / name)
    return tmp_path / "base", adapters


def test_assemble_then_load_as_toy(parts, tmp_path, monkeypatch):
    base, adapters = parts
    out = tmp_path / "toy"
    assemble(out, base, {"attn_moe": adapters["attn_moe"]}, update=False, notes=None)
    assert main(["--out", str(out), "--update", "--adapter", f"ippo={adapters['ippo']}"]) == 0
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["attn_moe", "ippo"]
    assert not list(out.rglob("*.bin")) and (out / "manifest.json").is_file()
    manifest = out / "manifest.json"   # `bytes`: the whole folder but the manifest, after --update rewrote it
    assert json.loads(manifest.read_text())["bytes"] == folder_bytes(out) - manifest.stat().st_size
    assert not [f for f in out.rglob("*.json") if "_name_or_path" in f.read_text()]   # no local paths shipped
    monkeypatch.setattr(presets, "TOY_DIR", out)
    pipe = MultiCrafterPipeline.from_pretrained("toy")
    assert pipe.adapter_name == "ippo"                   # the shipped default
    assert pipe.available_adapters() == ["attn_moe", "ippo"]
    pipe.load_adapter("attn_moe")
    assert pipe.adapter_name == "attn_moe"


def test_default_adapter_is_the_manifests_choice_and_survives_updates(parts, tmp_path, monkeypatch):
    """`--default-adapter none` ships a row without making it the default; --update keeps the choice; the app agrees."""
    from demo.state import NO_ADAPTER, ModelHolder

    base, adapters = parts
    out = tmp_path / "toy"
    assert main(["--base", str(base), "--out", str(out), "--adapter", f"ippo={adapters['ippo']}",
                 "--default-adapter", "none"]) == 0
    assert json.loads((out / "manifest.json").read_text())["default_adapter"] is None
    monkeypatch.setattr(presets, "TOY_DIR", out)
    assert MultiCrafterPipeline.from_pretrained("toy").adapter_name is None      # the base alone, ippo available
    assert ModelHolder("toy").default_adapter() == NO_ADAPTER
    assert main(["--out", str(out), "--update", "--adapter", f"attn_moe={adapters['attn_moe']}"]) == 0
    assert json.loads((out / "manifest.json").read_text())["default_adapter"] is None   # kept
    assert main(["--out", str(out), "--update", "--default-adapter", "attn_moe"]) == 0
    assert MultiCrafterPipeline.from_pretrained("toy").adapter_name == "attn_moe"
    assert ModelHolder("toy").default_adapter() == "attn_moe"
    before = (out / "manifest.json").read_text()
    with pytest.raises(UserError, match="not one of the adapters"):
        main(["--out", str(out), "--update", "--default-adapter", "nope"])
    assert (out / "manifest.json").read_text() == before                        # a refusal changes nothing
    (out / "manifest.json").write_text(json.dumps({"default_adapter": "gone"}))
    with pytest.raises(UserError, match="not one of the folder's adapters"):
        presets.default_adapter_for(out)


def test_refusals_leave_nothing_half_done(parts, tmp_path, monkeypatch):
    base, adapters = parts
    with pytest.raises(UserError, match="no model_index.json"):
        assemble(tmp_path / "x", tmp_path, {}, update=False, notes=None)
    with pytest.raises(UserError, match="not an adapter folder"):
        assemble(tmp_path / "x", base, {"bad": tmp_path}, update=False, notes=None)
    monkeypatch.setattr("train.assemble_toy.MAX_BYTES", 1000)
    with pytest.raises(UserError, match="budget"):
        assemble(tmp_path / "x", base, {}, update=False, notes=None)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_adapters_are_stored_in_half_precision_and_load_back(parts, tmp_path, monkeypatch):
    from safetensors import safe_open

    base, adapters = parts
    out = assemble(tmp_path / "toy", base, {"ippo": adapters["ippo"]}, update=False, notes=None)
    with safe_open(str(out / "adapters" / "ippo" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    monkeypatch.setattr(presets, "TOY_DIR", out)
    shipped = MultiCrafterPipeline.from_pretrained("toy")
    direct = MultiCrafterPipeline.from_pretrained("tiny")
    direct.load_adapter(adapters["ippo"])
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, output_type="np")
    a = shipped("a", generator=torch.Generator().manual_seed(0), **kw).images
    b = direct("a", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 1e-3   # fp16 rounding of the adapter only


def test_true_cfg_is_written_into_the_sampling_defaults_and_can_be_turned_off(tmp_path):
    (tmp_path / presets.SAMPLING_CONFIG).write_text(json.dumps({"guidance_scale": 1.0}))
    set_true_cfg(tmp_path, 3.0)
    assert presets.sampling_defaults_for(tmp_path) == {"guidance_scale": 1.0, "true_cfg_scale": 3.0, "negative_prompt": ""}
    set_true_cfg(tmp_path, 1.0)
    assert presets.sampling_defaults_for(tmp_path) == {"guidance_scale": 1.0}
    with pytest.raises(UserError, match="--true-cfg must be >= 1"):
        set_true_cfg(tmp_path, 0.0)
