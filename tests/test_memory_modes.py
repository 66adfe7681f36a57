"""Memory modes (quantisation, offload refusals, VAE tiling) and the fused LoRA for inference."""

import numpy as np
import pytest
import torch
from PIL import Image

from multicrafter import MultiCrafterPipeline
from multicrafter.adapters import (
    AdapterConfig,
    adapter_parameters,
    add_adapter,
    fuse_lora,
    load_adapter,
    lora_fused,
    save_adapter,
    set_adapter_enabled,
    unfuse_lora,
)
from multicrafter.errors import UserError
from multicrafter.memory import check_modes, is_quantized_weight, weight_bytes
from multicrafter.moe_lora import MoELoRAConfig
from multicrafter.presets import build_tiny_components

torch.set_num_threads(1)
MOE = MoELoRAConfig(rank=4, alpha=8.0, blocks="both", num_blocks=1)


def _img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _call(pipe, **kw):
    return pipe(prompt="a red circle", reference_images=[_img(0), _img(1)], height=64, width=64,
                num_inference_steps=2, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A tiny adapter (LoRA + MoE-LoRA) with every weight moved away from its init."""
    t = build_tiny_components()["transformer"]
    add_adapter(t, AdapterConfig(lora_rank=4, lora_alpha=4.0, moe=MOE))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(t):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(t, tmp_path_factory.mktemp("ad") / "adapter")


def _one_line(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unknown_and_cuda_only_modes_are_refused_in_one_line():
    _one_line(lambda: check_modes("int4"), "--quantize must be one of")
    _one_line(lambda: check_modes("none", "disk"), "--offload must be one of")
    assert _one_line(lambda: check_modes("nf4", cuda=False), "nf4") == "--quantize nf4 needs a CUDA GPU (bitsandbytes)"
    for mode in ("model", "sequential"):
        _one_line(lambda m=mode: check_modes("none", m, cuda=False), f"--offload {mode} needs a CUDA GPU")
    check_modes("int8", "none", cuda=False)
    check_modes("fp8", "none", cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_from_pretrained_refuses_cuda_modes_on_cpu():
    _one_line(lambda: MultiCrafterPipeline.from_pretrained("tiny", quantize="nf4"), "needs a CUDA GPU")
    _one_line(lambda: MultiCrafterPipeline.from_pretrained("tiny", offload="model"), "needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_tiny_generates_with_references_attention_and_adapter(mode, adapter_dir):
    full = MultiCrafterPipeline.from_pretrained("tiny")
    pipe = MultiCrafterPipeline.from_pretrained("tiny", quantize=mode)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.quantize == mode
    w = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert is_quantized_weight(w)
    assert is_quantized_weight(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight)
    assert weight_bytes(pipe.transformer) < weight_bytes(full.transformer)
    out = _call(pipe, return_attention=True)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    assert tuple(out.attention_maps.shape) == (2, 4, 4)
    pipe.load_adapter(adapter_dir, fuse=True)
    assert not lora_fused(pipe.transformer)         # quantised base weights take no merged LoRA
    on = _call(pipe).images
    with pipe.adapter_disabled():
        off = _call(pipe).images
    assert np.abs(on - off).max() > 1e-4            # the adapter acts on the quantised base


def test_fused_lora_matches_unfused_and_switching_off_gives_the_base_exactly(adapter_dir):
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    base = _call(pipe).images
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_adapter(adapter_dir)                  # the default: unfused (training loads this way)
    assert not lora_fused(pipe.transformer)
    unfused = _call(pipe).images
    pipe.load_adapter(adapter_dir, fuse=True)
    assert lora_fused(pipe.transformer)
    fused = _call(pipe).images
    assert np.abs(fused - unfused).max() < 1e-4 and np.abs(fused - base).max() > 1e-3
    with pipe.adapter_disabled():
        assert not lora_fused(pipe.transformer)
        np.testing.assert_array_equal(_call(pipe).images, base)
    assert lora_fused(pipe.transformer)             # switched on again: fused again, same result
    np.testing.assert_array_equal(_call(pipe).images, fused)
    pipe.unload_adapter()
    after = pipe.transformer.state_dict()
    assert set(after) == set(base_weights)
    assert all(torch.equal(after[k], base_weights[k]) for k in base_weights)
    np.testing.assert_array_equal(_call(pipe).images, base)


def test_fuse_unfuse_functions_restore_weights_bit_for_bit(adapter_dir):
    t = build_tiny_components()["transformer"]
    load_adapter(t, adapter_dir)
    lin = t.transformer_blocks[0].attn.to_q.base_layer
    before = lin.weight.detach().clone()
    assert fuse_lora(t) > 0 and not torch.equal(lin.weight, before)
    assert fuse_lora(t) == 0                        # already fused
    assert unfuse_lora(t) and torch.equal(lin.weight, before)
    assert not unfuse_lora(t)
    set_adapter_enabled(t, False)                   # never fused: switching stays unfused
    set_adapter_enabled(t, True)
    assert not lora_fused(t)


def test_generate_cli_records_the_quantize_mode(tmp_path):
    from multicrafter.generate import main
    from multicrafter.generation_params import read_generation_params

    a, out = tmp_path / "a.png", tmp_path / "out.png"
    _img(0).save(a)
    assert main(["--model", "tiny", "--quantize", "int8", "--ref", str(a), "--prompt", "a circle", "--out", str(out),
                 "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu"]) == 0
    meta = read_generation_params(out)
    assert meta["quantize"] == "int8" and meta["offload"] == "none"


def test_moe_top1_inference_path_matches_the_autograd_path_and_follows_weight_changes():
    from torch import nn

    from multicrafter.moe_lora import MoELoRALinear

    torch.manual_seed(0)
    m = MoELoRALinear(nn.Linear(8, 12), num_experts=4, top_k=1, rank=3, alpha=6.0, impl="dense").eval()
    with torch.no_grad():
        m.expert_B.normal_()
    x = torch.randn(2, 5, 8)
    with torch.enable_grad():
        ref = m(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
        m.expert_B.mul_(2.0)                        # an in-place change must not reuse the cached weights
        moved = m(x)
    with torch.enable_grad():
        torch.testing.assert_close(moved, m(x).detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(moved, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_app_flags_and_environment_refuse_cuda_modes_on_cpu(monkeypatch):
    from app import make_app

    _one_line(lambda: make_app(["--quantize", "nf4", "--no-warmup"]), "nf4 needs a CUDA GPU")
    monkeypatch.setenv("MULTICRAFTER_OFFLOAD", "sequential")
    _one_line(lambda: make_app(["--no-warmup"]), "--offload sequential needs a CUDA GPU")
    monkeypatch.setenv("MULTICRAFTER_OFFLOAD", "none")
    monkeypatch.setenv("MULTICRAFTER_QUANTIZE", "int4")
    _one_line(lambda: make_app(["--no-warmup"]), "--quantize must be one of")
