"""train.pretrain with a trained text side (train.train_text_encoders, model.t5_relative_buckets): the text encoders
really learn, are saved with the pipeline, resume exactly, and the encoding cache ignores them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from multicrafter import MultiCrafterPipeline
from multicrafter.errors import UserError
from tests.test_pretrain import LOSS_KEYS, write_cfg
from train.config import load_config
from train.metrics_log import read_metrics
from train.pretrain import PretrainConfig, Trainer, main

TEXT = dict(train__mode="base", attention_loss__weight=0.0, train__train_text_encoders=True,
            model__t5_relative_buckets=16, optim__text_encoder_lr=5e-3, optim__lr=1e-3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tmp_path_factory.mktemp("world_text") / "toyworld"


def test_text_encoders_train_and_are_saved_with_the_pipeline(tmp_path, world):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, world, **TEXT)
    assert main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    pipe = MultiCrafterPipeline.from_pretrained(str(out / "pipeline"))
    start = MultiCrafterPipeline.from_pretrained("tiny")
    t5 = pipe.text_encoder_2
    assert t5.config.relative_attention_num_buckets == 16
    assert t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (16, 4)
    for name in ("text_encoder", "text_encoder_2"):
        saved = load_file(out / "pipeline" / name / "model.safetensors")
        fresh = getattr(start, name).state_dict()
        same = [k for k, v in saved.items() if k in fresh and v.shape == fresh[k].shape and torch.equal(v, fresh[k])]
        assert len(same) < len(saved) / 2, (name, same)                  # most tensors moved
    # every T5 weight but the rebuilt position bias started from the model's own
    assert t5.config.d_model == start.text_encoder_2.config.d_model
    emb = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
               output_type="np").images
    assert emb.shape == (1, 64, 64, 3) and float(abs(emb).sum()) > 0


def test_gradients_reach_the_text_side_and_change_its_context_mixing(tmp_path, world):
    t = Trainer(load_config(write_cfg(tmp_path / "c", world, **TEXT), PretrainConfig), tmp_path / "out")
    assert len(t.optimizer.param_groups) == 2
    assert t.optimizer.param_groups[1]["initial_lr"] == pytest.approx(5e-3)
    bias = t.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    before = bias.detach().clone()
    t.train_step()
    assert not torch.equal(before, bias.detach())
    assert t.data._cache and t.data._cache[0]["prompt_embeds"] is None  # captions are never cached


def test_resume_restores_the_text_encoders_exactly(tmp_path, world):
    cfg = write_cfg(tmp_path, world, **TEXT, train__max_steps=4, output__checkpoint_every=2,
                    data__caption_dropout=0.5, train__ema_decay=0.9)
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(["--config", str(cfg), "--output-dir", str(full)])
    main(["--config", str(cfg), "--output-dir", str(cut), "--max-steps", "2"])
    main(["--config", str(cfg), "--output-dir", str(cut), "--resume"])
    a, b = read_metrics(full), read_metrics(cut)
    assert [[r[k] for k in LOSS_KEYS] for r in a] == [[r[k] for k in LOSS_KEYS] for r in b]
    for name in ("text_encoder", "text_encoder_2"):
        x = load_file(full / "pipeline" / name / "model.safetensors")
        y = load_file(cut / "pipeline" / name / "model.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_the_encoding_cache_does_not_depend_on_trained_text_weights(tmp_path, world):
    cache = tmp_path / "cache"
    t = Trainer(load_config(write_cfg(tmp_path / "a", world, **TEXT, data__cache_dir=str(cache)), PretrainConfig),
                tmp_path / "out_a")
    path = t.data.disk_cache_path(t.pipe, t.dtype)
    with torch.no_grad():
        for p in t.text_params:
            p.add_(0.5)
    assert t.data.disk_cache_path(t.pipe, t.dtype) == path
    assert len(list(cache.glob("encodings-*.pt"))) == 1


@pytest.mark.parametrize("over, needle", [
    (dict(train__mode="adapter", train__train_text_encoders=True), "train.mode: base"),
    (dict(TEXT, model__t5_relative_buckets=7), "even number"),
    (dict(TEXT, model__t5_relative_buckets=None, model__t5_local_heads=True), "needs model.t5_relative_buckets"),
])
def test_bad_text_settings_stop_with_one_line(tmp_path, world, over, needle):
    with pytest.raises(UserError) as e:
        main(["--config", str(write_cfg(tmp_path, world, **over)), "--output-dir", str(tmp_path / "out")])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_local_position_bias_gives_each_head_one_window_of_neighbours():
    from transformers.models.t5.modeling_t5 import T5Attention

    from train.toy_base import local_position_bias

    bias = local_position_bias(32, 4, 128, strength=6.0)

    def bucket(offset: int) -> int:
        return int(T5Attention._relative_position_bucket(torch.tensor(offset), bidirectional=True, num_buckets=32,
                                                         max_distance=128))

    windows = {0: range(-3, 0), 1: range(1, 4), 2: range(-8, -3), 3: range(4, 9)}
    for head, offsets in windows.items():
        inside = {bucket(o) for o in offsets}
        assert all(bias[b, head] == 6.0 for b in inside)
        assert all(bias[b, head] == 0.0 for b in set(range(32)) - inside)
    assert bias[bucket(0)].abs().sum() == 0                          # no head reads the word itself


def test_local_heads_make_a_word_depend_on_its_neighbours():
    """The toy's diagnosis in a test: the tiny random T5 (the frozen-text base's text side) gives a word almost the
    same vector whatever surrounds it; rebuilt with local windows it does not."""
    from train.toy_base import rebuild_t5_position_bias

    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    tok = pipe.tokenizer_2
    a = "a pink dotted circle on the left, on a green checkered background"
    b = "a pink checkered circle on the left, on a green dotted background"

    def dotted(t5, text):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = t5(ids).last_hidden_state[0]
        return out[ids[0].tolist().index(tok.convert_tokens_to_ids("▁dotted"))]

    def cos(t5):
        return float(torch.cosine_similarity(dotted(t5, a), dotted(t5, b), dim=0))

    local = rebuild_t5_position_bias(pipe.text_encoder_2, 32, local_heads=True)
    assert cos(pipe.text_encoder_2) > 0.99 and cos(local) < 0.95, (cos(pipe.text_encoder_2), cos(local))
    assert rebuild_t5_position_bias(local, 32, local_heads=True) is local     # already 32 buckets: kept as is
