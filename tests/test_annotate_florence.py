"""Florence-2 grounding: output parsing, a tiny random model end to end, the unavailable path, box -> mask glue."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from annotate.florence import (
    FlorenceGrounder,
    FlorenceUnavailable,
    Grounding,
    ground_subjects,
    parse_grounding,
    preannotate_dataset,
)
from annotate.import_folder import import_folder
from annotate.segment import Segmenter
from multicrafter.dataset_format import errors_of, validate_dataset
from multicrafter.errors import UserError

WORDS = "locate the phrases in caption : a red ball and blue cube".split()


def test_parse_grounding_dequantises_bin_centres():
    text = "</s><s>a red ball<loc_100><loc_200><loc_299><loc_399>blue cube<loc_0><loc_0><loc_999><loc_499>" \
           "<loc_500><loc_500><loc_600><loc_600></s>"
    got = parse_grounding(text, width=200, height=100)
    assert [g.label for g in got] == ["a red ball", "blue cube", "blue cube"]
    assert np.allclose(got[0].box, [20.1, 20.05, 59.9, 39.95])
    assert np.allclose(got[1].box, [0.1, 0.05, 199.9, 49.95])
    assert parse_grounding("no boxes here", 10, 10) == []
    assert parse_grounding("flat<loc_5><loc_5><loc_5><loc_9>", 10, 10) == []  # zero-width box dropped


@pytest.fixture(scope="module")
def tiny_florence_dir(tmp_path_factory):
    """A random Florence2ForConditionalGeneration (~0.1 M parameters) + a word-level tokenizer with <loc_*> tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Florence2Config, Florence2ForConditionalGeneration, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("florence") / "tiny"
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + WORDS + [f"<loc_{i}>" for i in range(1000)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(path)
    vision = dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 1, 1], num_groups=[1, 1, 1, 1],
                  window_size=2, projection_dim=32, max_position_embeddings=8, max_temporal_embeddings=4)
    text = dict(model_type="bart", vocab_size=len(words), d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                decoder_start_token_id=2, forced_bos_token_id=None)
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text, image_token_id=4)) \
        .save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 64, "width": 64}}))
    return path


def test_tiny_florence_runs_end_to_end(tiny_florence_dir):
    g = FlorenceGrounder.from_pretrained(tiny_florence_dir, max_new_tokens=12)
    assert g.image_size == 64 and g.num_image_tokens == 5  # (64 / 32)^2 grid tokens + 1 temporal token
    seen = {}
    orig = g.model.generate
    g.model.generate = lambda **kw: seen.update(kw) or orig(**kw)
    out = g(Image.new("RGB", (50, 30), (200, 20, 20)), "a red ball")
    assert isinstance(out, list) and all(isinstance(x, Grounding) for x in out)
    for x in out:
        assert 0 <= x.box[0] < x.box[2] <= 50 and 0 <= x.box[1] < x.box[3] <= 30
    ids = seen["input_ids"][0].tolist()
    assert ids[:5] == [4] * 5 and ids[5] == 1 and ids[-1] == 2  # image tokens, <s>, prompt, </s>
    assert seen["pixel_values"].shape == (1, 3, 64, 64)


def test_florence_unavailable_is_one_clear_message(tmp_path, monkeypatch):
    from tests.hub_cache import use_hub_cache

    use_hub_cache(monkeypatch, tmp_path / "hub")   # offline (as every test) with an empty cache
    with pytest.raises(FlorenceUnavailable) as info:
        FlorenceGrounder.from_pretrained("florence-community/Florence-2-base-ft")
    assert str(info.value) == ("Florence-2 (florence-community/Florence-2-base-ft) is not available offline: run once "
                               "online or pass MULTICRAFTER_FLORENCE=/path/to/folder or --florence /path/to/folder")
    assert isinstance(info.value, UserError)
    with pytest.raises(FlorenceUnavailable, match="folder has no config.json"):
        FlorenceGrounder.from_pretrained(tmp_path)


def test_florence_hub_id_loads_from_the_hugging_face_cache_offline(tiny_florence_dir, tmp_path, monkeypatch):
    """A hub id in the cache layout loads offline, preprocessor_config.json included (same call as a download)."""
    from tests.hub_cache import place_in_hub_cache, use_hub_cache

    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    place_in_hub_cache(cache, "tiny-org/florence", tiny_florence_dir)
    g = FlorenceGrounder.from_pretrained("tiny-org/florence", max_new_tokens=4)
    assert g.image_size == 64   # from the cached preprocessor_config.json, not the 768 default
    local = FlorenceGrounder.from_pretrained(tiny_florence_dir, max_new_tokens=4)
    img = Image.new("RGB", (50, 30), (200, 20, 20))
    assert torch.equal(g._pixels(img), local._pixels(img))
    for a, b in zip(g.model.parameters(), local.model.parameters()):
        assert torch.equal(a, b)


def scene(seed: int):
    rng = np.random.default_rng(seed)
    img = (rng.normal(0, 15, (90, 120, 3)) + np.array([40, 120, 60])).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:90, :120]
    ball = (xx - 35) ** 2 + (yy - 45) ** 2 <= 18 ** 2
    cube = (abs(xx - 90) <= 14) & (abs(yy - 40) <= 14)
    img[ball] = (210, 40, 40)
    img[cube] = (40, 40, 220)
    return img, {"ball": ball, "cube": cube}


def fake_ground(image: Image.Image, text: str) -> list[Grounding]:
    """Stands in for Florence-2: knows where 'ball' and 'cube' are (at any image size)."""
    sx, sy = image.width / 120, image.height / 90
    boxes = {"ball": [12, 22, 58, 68], "cube": [70, 20, 110, 60]}
    hits = [Grounding(k, [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]) for k, b in boxes.items() if k in text]
    return hits


def test_box_to_mask_glue():
    img, truth = scene(0)
    seg = Segmenter("grabcut")
    subs = ground_subjects(img, fake_ground, seg, names=["ball", "cube", "unicorn"])
    assert [s.name for s in subs] == ["ball", "cube"]  # 'unicorn' not found: left out, the review shows it
    for s in subs:
        inter = (s.mask & truth[s.name]).sum()
        assert inter / (s.mask | truth[s.name]).sum() >= 0.9
    from_caption = ground_subjects(img, fake_ground, seg, caption="a ball next to a cube")
    assert [s.name for s in from_caption] == ["ball", "cube"]
    with pytest.raises(UserError):
        ground_subjects(img, fake_ground, seg)


def test_preannotate_imported_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(scene(i)[0]).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text("a ball and a cube")
    import_folder(src, tmp_path / "ds")
    report = preannotate_dataset(tmp_path / "ds", fake_ground, Segmenter("grabcut"), names=["ball", "cube"])
    assert report.found == {"img0": ["ball", "cube"], "img1": ["ball", "cube"]} and report.skipped == []
    assert not errors_of(validate_dataset(tmp_path / "ds"))
    lines = [json.loads(x) for x in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert all(s["auto"] is True and s["kind"] == "object" for line in lines for s in line["subjects"])
    again = preannotate_dataset(tmp_path / "ds", fake_ground, Segmenter("grabcut"), names=["ball"])
    assert again.found == {} and again.skipped == []  # reviewed/filled samples are never overwritten


class RefusesOnce:
    """A segmenter that refuses its first box (as SAM 2 does with a bad prompt), then works like GrabCut."""

    def __init__(self):
        self.inner, self.calls = Segmenter("grabcut"), 0

    def segment(self, image, **kw):
        self.calls += 1
        if self.calls == 1:
            raise UserError("box lies outside the image")
        return self.inner.segment(image, **kw)


def test_preannotate_skips_bad_samples_and_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, caption in enumerate(["", "a ball and a cube", "a ball and a cube"]):
        Image.fromarray(scene(i)[0]).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(caption)
    import_folder(src, tmp_path / "ds")
    report = preannotate_dataset(tmp_path / "ds", fake_ground, RefusesOnce())
    assert report.found == {"img2": ["ball", "cube"]}
    assert [name for name, _ in report.skipped] == ["img0", "img1"]
    assert "caption" in report.skipped[0][1] and report.skipped[1][1] == "box lies outside the image"
    assert all("\n" not in why for _, why in report.skipped)
    assert not errors_of(validate_dataset(tmp_path / "ds"))
    lines = [json.loads(x) for x in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert [len(line["subjects"]) for line in lines] == [0, 0, 2]   # skipped samples are left for manual work
