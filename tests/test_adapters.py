"""Adapter folders: save→load round trip, stock FluxPipeline compatibility, on/off switch, replacement, refusals."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

import multicrafter.adapters as adapters
from multicrafter.adapters import (
    CONFIG_FILE,
    LORA_FILE,
    MOE_FILE,
    AdapterConfig,
    adapter_parameters,
    add_adapter,
    has_adapter,
    load_adapter,
    remove_adapter,
    save_adapter,
    set_adapter_enabled,
)
from multicrafter.errors import UserError
from multicrafter.moe_lora import MoELoRAConfig, moe_modules, set_moe_enabled
from multicrafter.presets import build_tiny_components

MOE = MoELoRAConfig(rank=4, alpha=8.0, blocks="both", num_blocks=1)


def fresh():
    return build_tiny_components()["transformer"]


def out(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 16, 64, generator=g),
                           encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                           pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.6]),
                           guidance=torch.tensor([3.5]), img_ids=torch.randn(16, 3, generator=g),
                           txt_ids=torch.zeros(5, 3), return_dict=False)[0]


def trained(cfg: AdapterConfig, seed: int = 3):
    """A transformer with the adapter added and every adapter weight (B included) moved away from its init."""
    t = fresh()
    add_adapter(t, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(t):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return t


def one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_config_round_trip_and_refusals():
    cfg = AdapterConfig(lora_rank=8, lora_alpha=4.0, moe=MOE, extra={"reference_style": "uno", "ref_timestep_zero": False})
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    one_line_error(lambda: AdapterConfig.from_dict({"lora_rank": 4, "rnak": 3}), "unknown adapter config key")
    one_line_error(lambda: AdapterConfig.from_dict({"moe": {"experts": 2}}), "unknown MoE-LoRA config key")
    one_line_error(lambda: AdapterConfig.from_dict({"format": "other"}), "unsupported adapter config format")
    one_line_error(lambda: AdapterConfig(lora_rank=-1), "lora_rank")
    one_line_error(lambda: AdapterConfig(lora_targets="(unclosed"), "regex")


def test_add_adapter_starts_as_identity_and_trains_only_adapter_weights():
    base = out(fresh())
    t = fresh()
    names = add_adapter(t, AdapterConfig(lora_rank=4, moe=MOE))
    assert "single_transformer_blocks.1.proj_mlp" in names and "transformer_blocks.1.attn.add_k_proj" in names
    assert "proj_out" not in names
    assert torch.equal(out(t), base)
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".router." in n or ".expert_" in n for n in trainable)
    assert len(trainable) == len(adapter_parameters(t))
    one_line_error(lambda: add_adapter(t, AdapterConfig()), "already has an adapter")


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = AdapterConfig(lora_rank=4, lora_alpha=6.0, moe=MOE, extra={"reference_style": "uno"})
    t = trained(cfg)
    expected = out(t)
    assert not torch.allclose(expected, out(fresh()), atol=1e-3)
    save_adapter(t, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([CONFIG_FILE, LORA_FILE, MOE_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp folder left behind
    assert all(k.startswith("transformer.") and ".lora_" in k for k in load_file(tmp_path / "ad" / LORA_FILE))
    t2 = fresh()
    assert load_adapter(t2, tmp_path / "ad") == cfg
    assert torch.equal(out(t2), expected)
    set_adapter_enabled(t2, False)
    assert torch.equal(out(t2), out(fresh()))
    set_adapter_enabled(t2, True)
    assert torch.equal(out(t2), expected)


@pytest.mark.parametrize("with_moe", [False, True])
def test_lora_part_loads_into_stock_flux_pipeline(tmp_path, with_moe):
    cfg = AdapterConfig(lora_rank=4, lora_alpha=2.0, moe=MOE if with_moe else None)  # alpha != rank: metadata matters
    save_adapter(trained(cfg), tmp_path / "ad")
    stock = FluxPipeline(**build_tiny_components())
    stock.load_lora_weights(str(tmp_path / "ad"))
    ours = fresh()
    load_adapter(ours, tmp_path / "ad")
    set_moe_enabled(ours, False)
    expected = out(ours)
    assert not torch.allclose(expected, out(fresh()), atol=1e-3)
    assert torch.allclose(out(stock.transformer), expected, atol=1e-6)


def test_plain_diffusers_lora_folder_loads_with_inferred_rank(tmp_path):
    t = trained(AdapterConfig(lora_rank=3, lora_alpha=3.0))
    from peft.utils import get_peft_model_state_dict

    FluxPipeline.save_lora_weights(tmp_path / "plain", transformer_lora_layers=get_peft_model_state_dict(
        t, adapter_name=adapters.ADAPTER_NAME))  # no metadata, no config: what other trainers ship
    ours = fresh()
    cfg = load_adapter(ours, tmp_path / "plain")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.moe) == (3, 3.0, None)
    assert torch.allclose(out(ours), out(t), atol=1e-6)


def test_loading_a_second_adapter_replaces_the_first_and_remove_restores_base(tmp_path):
    base = out(fresh())
    a, b = AdapterConfig(lora_rank=2, moe=MOE), AdapterConfig(lora_rank=5, lora_alpha=5.0)
    save_adapter(trained(a, seed=4), tmp_path / "a")
    t_b = trained(b, seed=5)
    save_adapter(t_b, tmp_path / "b")
    t = fresh()
    load_adapter(t, tmp_path / "a")
    assert moe_modules(t)
    assert load_adapter(t, tmp_path / "b") == b
    assert not moe_modules(t) and torch.equal(out(t), out(t_b))
    assert remove_adapter(t) and not has_adapter(t)
    assert torch.equal(out(t), base)
    assert not remove_adapter(t)


def test_bad_folders_are_refused_with_one_line_and_keep_the_current_adapter(tmp_path):
    cfg = AdapterConfig(lora_rank=4, moe=MOE)
    save_adapter(trained(cfg), tmp_path / "good")
    t = fresh()
    load_adapter(t, tmp_path / "good")
    before = out(t)
    one_line_error(lambda: load_adapter(t, tmp_path / "missing"), "not found")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_adapter(t, tmp_path / "empty"), "not an adapter folder")
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: load_adapter(t, tmp_path / "file"), "not a folder")

    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in (tmp_path / "good").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def wrong_lora_shape(d):
        sd = load_file(d / LORA_FILE)
        key = next(k for k in sd if k.endswith("lora_A.weight"))
        sd[key] = torch.zeros(4, 7)
        save_file(sd, d / LORA_FILE)

    def wrong_moe_shape(d):
        sd = load_file(d / MOE_FILE)
        key = next(k for k in sd if k.endswith("expert_B"))
        sd[key] = torch.zeros(2, *sd[key].shape[1:])
        save_file(sd, d / MOE_FILE)

    cases = {
        "lora_shape": (wrong_lora_shape, "do not fit"),
        "moe_shape": (wrong_moe_shape, "has shape"),
        "corrupt": (lambda d: (d / LORA_FILE).write_bytes(b"not safetensors"), "cannot read"),
        "bad_json": (lambda d: (d / CONFIG_FILE).write_text("{"), "cannot read"),
        "unknown_key": (lambda d: (d / CONFIG_FILE).write_text(json.dumps({"lora_rank": 4, "colour": 1})), "unknown"),
        "rank": (lambda d: (d / CONFIG_FILE).write_text(json.dumps(AdapterConfig(lora_rank=8, moe=MOE).to_dict())),
                 "rank 4"),
        "no_moe_file": (lambda d: (d / MOE_FILE).unlink(), "no moe_lora"),
    }
    for name, (edit, match) in cases.items():
        one_line_error(lambda d=variant(name, edit): load_adapter(t, d), match)
        assert torch.equal(out(t), before), name  # refused before touching the loaded adapter


def test_save_is_atomic_and_refuses_foreign_folders(tmp_path, monkeypatch):
    t1, t2 = trained(AdapterConfig(lora_rank=4, moe=MOE), seed=1), trained(AdapterConfig(lora_rank=4, moe=MOE), seed=2)
    save_adapter(t1, tmp_path / "ad")
    first = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        if not str(filename).endswith(MOE_FILE):
            return real_save(tensors, filename, metadata=metadata)
        assert (next(tmp_path.glob(".*.tmp-*")) / LORA_FILE).is_file()  # the LoRA file is already written
        raise KeyboardInterrupt  # killed while writing the MoE weights

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(t2, tmp_path / "ad")
    with pytest.raises(KeyboardInterrupt):
        save_adapter(t2, tmp_path / "new")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == first
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no half adapter, no temp folder
    save_adapter(t2, tmp_path / "ad")  # a complete save replaces the old adapter
    t = fresh()
    load_adapter(t, tmp_path / "ad")
    assert torch.equal(out(t), out(t2))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line_error(lambda: save_adapter(t2, tmp_path / "mine"), "not an adapter folder")
    one_line_error(lambda: save_adapter(fresh(), tmp_path / "x"), "no MultiCrafter adapter")


def test_fusing_for_inference_merges_the_experts_and_unfusing_restores_the_training_path():
    from multicrafter.adapters import fuse_lora, unfuse_lora
    from multicrafter.moe_lora import moe_modules

    t = fresh()
    add_adapter(t, AdapterConfig(lora_rank=4, moe=MOE))
    with torch.no_grad():
        for p in adapter_parameters(t):
            p.normal_(0, 0.2)
    training = out(t)
    assert fuse_lora(t) > 0 and all(m.merge_experts for m in moe_modules(t).values())
    fused = out(t)
    assert torch.allclose(fused, training, atol=1e-4) and not torch.equal(fused, training)
    unfuse_lora(t)
    assert not any(m.merge_experts for m in moe_modules(t).values())
    assert torch.equal(out(t), training)
