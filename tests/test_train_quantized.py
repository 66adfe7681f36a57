"""Training on a quantised frozen base (QLoRA-style, `model.quantize`): pre-training and IPPO train the adapter in
fp32 through torchao int8/fp8 linears, the adapter they save is the ordinary format, and modes or combinations that
cannot work stop with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train.ippo as ippo
from multicrafter import MultiCrafterPipeline
from multicrafter.adapters import adapter_parameters, base_linear
from multicrafter.errors import UserError
from multicrafter.memory import is_quantized_weight
from train.config import load_config
from train.pretrain import PretrainConfig, Trainer

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "train/configs/tiny_pretrain.yaml"
IPPO = REPO / "train/configs/tiny_ippo.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("world") / "toyworld"


def _trainer(out: Path, world: Path, **overrides) -> Trainer:
    over = {"data.toyworld.n": 4, "data.toyworld.folder": str(world), "output.progress": False,
            "train.max_steps": 2, "data.caption_dropout": 0.0, "attention_loss.weight": 0.5}
    over.update(overrides)
    return Trainer(load_config(PRETRAIN, PretrainConfig, over), out)


def _frozen_weight(tr) -> torch.Tensor:
    return base_linear(tr, "transformer_blocks.0.attn.to_q").weight


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_pretrain_on_a_quantized_base_trains_the_adapter_and_saves_a_plain_one(tmp_path, world, mode):
    full = _trainer(tmp_path / "full", world)
    quant = _trainer(tmp_path / "quant", world, **{"model.quantize": mode, "model.gradient_checkpointing": True})
    tr = quant.transformer
    assert is_quantized_weight(_frozen_weight(tr)) and not is_quantized_weight(_frozen_weight(full.transformer))
    params = adapter_parameters(tr)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert {id(p) for p in tr.parameters() if p.requires_grad} == {id(p) for p in params}
    start = [p.detach().clone() for p in params]

    rec_full, rec_quant = full.train_step(), quant.train_step()
    # Same data, noise and adapter init: the losses differ only by the base's quantisation error.
    assert rec_quant["loss_attn"] > 0
    assert rec_quant["loss"] != rec_full["loss"]
    assert abs(rec_quant["loss"] - rec_full["loss"]) < 0.05 * rec_full["loss"]
    quant.train_step()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start, params))

    adapter = quant.save_final()
    plain = MultiCrafterPipeline.from_pretrained("tiny")
    ref = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    kw = dict(prompt="a red circle", reference_images=[ref], height=64, width=64, num_inference_steps=2,
              max_sequence_length=16, output_type="np")
    before = plain(generator=torch.Generator().manual_seed(0), **kw).images
    plain.load_adapter(adapter)
    after = plain(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(after).all() and not np.allclose(before, after)


def test_ippo_on_an_int8_base_updates_on_policy(tmp_path, monkeypatch):
    built = []

    def spy(*args, **kwargs):
        pipe = ippo_build(*args, **kwargs)
        built.append(pipe)
        return pipe

    ippo_build = ippo.build_model
    monkeypatch.setattr(ippo, "build_model", spy)
    cfg = load_config(IPPO, ippo.IPPOConfig, {"model.quantize": "int8", "train.sample_every": 0})
    result = ippo.train(cfg, output_dir=tmp_path / "run", max_steps=1, log=lambda _: None)
    assert is_quantized_weight(_frozen_weight(built[0].transformer))
    assert result["last"]["ratio_first"] == 1.0
    assert np.isfinite(result["last"]["loss"]) and result["last"]["grad_norm"] > 0
    MultiCrafterPipeline.from_pretrained("tiny").load_adapter(result["adapter_dir"])


@pytest.mark.parametrize("overrides,match", [
    ({"model.quantize": "int4"}, "model.quantize must be one of none, int8, fp8, nf4"),
    ({"model.quantize": "int8", "train.mode": "base"}, "model.quantize needs train.mode: adapter"),
    ({"model.quantize": "int8", "model.vae": "somewhere"}, "cannot be combined with init_transformer"),
])
def test_pretrain_quantize_config_errors_are_one_line(overrides, match):
    with pytest.raises(UserError, match=match) as err:
        load_config(PRETRAIN, PretrainConfig, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nf4_without_a_gpu_is_refused_before_the_model_loads(tmp_path, world):
    with pytest.raises(UserError, match=r"^model.quantize: --quantize nf4 needs a CUDA GPU"):
        _trainer(tmp_path / "nf4", world, **{"model.quantize": "nf4"})
    with pytest.raises(UserError, match="model.quantize must be one of"):
        load_config(IPPO, ippo.IPPOConfig, {"model.quantize": "q4"})
