"""Shared transformer state around pipeline calls and adapter switches: nothing leaks from one call to the next."""

import numpy as np
import pytest
import torch
from PIL import Image

from multicrafter import MultiCrafterPipeline
from multicrafter.adapters import AdapterConfig, add_adapter, remove_adapter, save_adapter
from multicrafter.attention import AttentionCapture, CaptureLayout, install_capture
from multicrafter.errors import UserError
from multicrafter.ref_timestep import install_ref_timestep

KW = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, output_type="np")
REF = [Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))]


def _gen(pipe, **kw):
    return pipe("a", generator=torch.Generator().manual_seed(0), **{**KW, **kw}).images


def _adapter(tmp_path, name, extra=None, fill=0.02):
    t = MultiCrafterPipeline.from_pretrained("tiny").transformer
    add_adapter(t, AdapterConfig(lora_rank=2, lora_alpha=2.0, extra=extra or {}))
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.fill_(fill)
    out = save_adapter(t, tmp_path / name)
    remove_adapter(t)
    return out


@pytest.fixture()
def pipe():
    return MultiCrafterPipeline.from_pretrained("tiny")


def test_refused_adapter_keeps_the_loaded_one(pipe, tmp_path):
    good = _adapter(tmp_path, "good")
    pipe.load_adapter(good)
    before = _gen(pipe, reference_images=REF)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError):
        pipe.load_adapter(bad)
    assert pipe.adapter_name == str(good)
    assert np.array_equal(before, _gen(pipe, reference_images=REF))


def test_reference_options_are_rebuilt_per_adapter(pipe, tmp_path):
    uno = _adapter(tmp_path, "uno", {"reference_style": "uno", "sampling_defaults": {"guidance_scale": 4.0}})
    sized = _adapter(tmp_path, "sized", {"reference_sizes": {"long_side_single": 32, "long_side_multi": 16}})
    pipe.load_adapter(uno)
    assert pipe.reference_options.style == "uno" and pipe.sampling_defaults == {"guidance_scale": 4.0}
    pipe.load_adapter(sized)
    assert pipe.reference_options.style == "multicrafter" and pipe.sampling_defaults == {}
    assert (pipe.reference_options.long_side_single, pipe.reference_options.long_side_multi) == (32, 16)
    pipe.unload_adapter()
    assert pipe.adapter_name is None and pipe.reference_options.long_side_single == 64


def test_adapter_disabled_restores_the_previous_state(pipe, tmp_path):
    pipe.load_adapter(_adapter(tmp_path, "a"))
    on = _gen(pipe)
    pipe.set_adapter_enabled(False)
    off = _gen(pipe)
    with pipe.adapter_disabled():
        pass
    assert np.array_equal(off, _gen(pipe)), "leaving adapter_disabled must not switch a disabled adapter on"
    pipe.set_adapter_enabled(True)
    assert np.array_equal(on, _gen(pipe)) and not np.array_equal(on, off)


def test_an_installed_capture_is_left_as_found(pipe):
    """The trainer's capture (with its last layout) must neither break nor change plain generation."""
    plain = _gen(pipe)
    stale = CaptureLayout(n_text=3, n_target=5, ref_lengths=[7])
    cap = AttentionCapture(mode="img2ref", layout=stale)
    install_capture(pipe.transformer, cap)
    assert np.array_equal(plain, _gen(pipe))                          # no references, capture left installed
    out = pipe("a", reference_images=REF, return_attention=True, generator=torch.Generator().manual_seed(0), **KW)
    assert out.attention_maps.shape[0] == 1
    assert cap.layout is stale and cap.mode == "img2ref" and cap.enabled


def test_ref_timestep_state_is_restored(pipe):
    plain = _gen(pipe, reference_images=REF)
    state = install_ref_timestep(pipe.transformer)
    state.enabled, state.n_ref = True, 3                                # a trainer's leftover
    assert np.array_equal(plain, _gen(pipe, reference_images=REF))      # the pipeline's option is off: stock path
    assert (state.enabled, state.n_ref) == (True, 3)


def test_model_folder_sampling_defaults_under_adapter_ones(tmp_path):
    """A model folder's multicrafter_sampling.json (the toy base: guidance 1.0, the only value it was trained on) is
    used when an argument is left out; an adapter's own defaults win over it; unloading the adapter restores it."""
    folder = tmp_path / "model"
    MultiCrafterPipeline.from_pretrained("tiny").save_pretrained(folder)
    (folder / "multicrafter_sampling.json").write_text('{"guidance_scale": 1.0, "num_inference_steps": 3}')
    pipe = MultiCrafterPipeline.from_pretrained(str(folder))
    assert pipe.sampling_defaults == {"guidance_scale": 1.0, "num_inference_steps": 3}
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(float(k["guidance"][0])), with_kwargs=True)
    pipe("a", height=32, width=32, max_sequence_length=8, output_type="np")
    assert seen == [1.0] * 3  # the folder's guidance and step count, not FluxPipeline's 3.5 and 28
    pipe.load_adapter(_adapter(tmp_path, "uno", {"sampling_defaults": {"guidance_scale": 4.0}}))
    assert pipe.sampling_defaults == {"guidance_scale": 4.0, "num_inference_steps": 3}
    pipe.unload_adapter()
    assert pipe.sampling_defaults == {"guidance_scale": 1.0, "num_inference_steps": 3}


@pytest.mark.parametrize("text, message", [("[1]", "JSON object"), ('{"guidance": 1}', "unknown key"), ("{", "bad")])
def test_bad_sampling_file_is_one_line(tmp_path, text, message):
    from multicrafter.presets import sampling_defaults_for

    (tmp_path / "multicrafter_sampling.json").write_text(text)
    with pytest.raises(UserError, match=message):
        sampling_defaults_for(tmp_path)


def test_call_signature_names_and_documents_its_arguments():
    """`help(pipe)` shows every explicit argument with an entry under Args:, and a Returns: section."""
    import inspect
    import re

    from diffusers import FluxPipeline

    sig = inspect.signature(MultiCrafterPipeline.__call__)
    explicit = [n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
    for name in ("prompt", "reference_images", "reference_options", "return_attention", "attention_mode",
                 "attention_blocks", "use_adapter", "height", "width", "num_inference_steps", "guidance_scale",
                 "generator", "output_type", "return_dict"):
        assert name in explicit
    assert any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())   # every other stock argument passes through
    doc = MultiCrafterPipeline.__call__.__doc__
    args, _, returns = doc.partition("Returns:")
    documented = set(re.findall(r"^\s{12}(\w+) \(", args, flags=re.M))
    assert set(explicit) <= documented, set(explicit) - documented
    assert returns.strip()
    stock = set(inspect.signature(FluxPipeline.__call__).parameters) - {"self"}
    assert set(explicit) - {"reference_images", "reference_options", "return_attention", "attention_mode",
                            "attention_blocks", "attention_single_blocks", "attention_heads", "use_adapter"} <= stock


def test_pipelines_do_not_share_mutable_state(pipe):
    other = MultiCrafterPipeline.from_pretrained("tiny")
    pipe.sampling_defaults["num_inference_steps"] = 1
    pipe.reference_options.long_side_single = 16
    assert other.sampling_defaults == {} and other.reference_options.long_side_single == 64


def test_stock_argument_left_as_none_takes_the_stock_default(pipe):
    """guidance_scale=None (no sampling default) is FluxPipeline's 3.5, not an error."""
    assert np.array_equal(_gen(pipe, guidance_scale=None), _gen(pipe, guidance_scale=3.5))
