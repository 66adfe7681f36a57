"""Object ID-Sim (Hungarian over mask crops) and the real-image IPPO reward (RewardFn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics_models import PROJ, _laion_head, build_tiny_clip
from torch import nn

from multicrafter.metrics.clip import ClipScorer
from multicrafter.metrics.face_dlib import DlibBackend
from multicrafter.metrics.loading import ModelUnavailable
from multicrafter.metrics.objects import mask_box, subject_similarity
from multicrafter.rewards.base import RewardBatch, composite
from multicrafter.rewards.real import RealReward

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def colour_embed(images) -> torch.Tensor:
    """A transparent stand-in for DINO: the mean colour, as a unit vector (same colour ⇒ cosine 1)."""
    return nn.functional.normalize(torch.tensor(np.stack([np.asarray(i, np.float32).mean((0, 1)) for i in images])),
                                   dim=-1)


def scene(left, right) -> tuple[Image.Image, list[Image.Image]]:
    img = Image.new("RGB", (96, 64), (0, 0, 0))
    img.paste(Image.new("RGB", (30, 30), left), (5, 20))
    img.paste(Image.new("RGB", (30, 30), right), (60, 10))
    masks = []
    for box in ((5, 20, 35, 50), (60, 10, 90, 40)):
        m = Image.new("L", img.size, 0)
        m.paste(255, box)
        masks.append(m)
    return img, masks


def swatch(colour) -> Image.Image:
    return Image.new("RGB", (20, 20), colour)


def test_object_subjects_are_matched_one_to_one():
    img, masks = scene(RED, BLUE)
    res = subject_similarity(img, [swatch(BLUE), swatch(RED)], colour_embed, masks=masks)
    assert sorted((m["reference"], m["crop"]) for m in res.matches) == [(0, 1), (1, 0)]
    assert res.score == pytest.approx(1.0, abs=1e-5) and res.crops == 2
    assert res.matches[0]["box"] in ([5, 20, 35, 50], [60, 10, 90, 40])
    copies, masks2 = scene(RED, RED)   # the "average subject" hack: one subject drawn twice
    hacked = subject_similarity(copies, [swatch(BLUE), swatch(RED)], colour_embed, masks=masks2)
    assert hacked.per_reference[1] == pytest.approx(1.0, abs=1e-5)
    assert hacked.score < 0.75 and hacked.per_reference[0] < 0.5


def test_object_masks_empty_or_absent():
    img, masks = scene(RED, GREEN)
    empty = Image.new("L", img.size, 0)
    res = subject_similarity(img, [swatch(RED), swatch(GREEN)], colour_embed, masks=[masks[0], empty])
    assert res.crops == 1 and any("mask 1 is empty" in n for n in res.notes)
    assert res.per_reference[0] == pytest.approx(1.0, abs=1e-5)
    none = subject_similarity(img, [swatch(RED)], colour_embed, masks=[empty])
    assert none.score == 0.0 and none.crops == 0
    whole = subject_similarity(img, [swatch(RED), swatch(GREEN)], colour_embed)
    e = colour_embed([swatch(RED), swatch(GREEN), img])
    assert whole.score == pytest.approx(float(((e[:2] @ e[2]).clamp(min=0)).mean()), abs=1e-6)
    assert mask_box(masks[0].resize((48, 32)), img.size) == (4, 20, 36, 50)   # masks at another size are rescaled


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("reward")
    build_tiny_clip(d / "clip")
    torch.save({f"layers.{k}": v for k, v in _laion_head(PROJ).state_dict().items()}, d / "head.pth")
    return d


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((384, 384))
    return img, img.crop((110, 30, 220, 150))   # the face, as a reference photo


def test_real_reward_components_and_notes(tiny, astronaut):
    img, face_ref = astronaut
    reward = RealReward.load(clip_model=str(tiny / "clip"), aes_clip=str(tiny / "clip"), aes_head=str(tiny / "head.pth"))
    assert reward.components == ("text", "aes", "id") and reward.missing == {}
    assert reward.aes.clip is reward.text                 # one CLIP in memory when both use the same checkpoint
    blank = Image.new("RGB", (384, 384), (90, 90, 90))
    batch = RewardBatch(images=[img, blank], prompts=["a woman", "a wall"], references=[[face_ref], [face_ref]])
    out = reward(batch)
    assert set(out.components) == {"text", "aes", "id"} and all(len(v) == 2 for v in out.components.values())
    assert out.components["id"][0] > 0.5 and out.components["id"][1] == 0.0
    assert any(n.startswith("sample 1: no face detected") for n in out.notes)
    assert out.components["text"] == pytest.approx(reward.text.clip_t(batch.images, batch.prompts), abs=1e-6)
    assert len(reward._ref_cache) == 1                    # the shared reference was embedded once
    total = composite(out.components, {"text": 1.0, "aes": 0.1, "id": 2.0})
    expect = [out.components["text"][i] + 0.1 * out.components["aes"][i] + 2 * out.components["id"][i] for i in (0, 1)]
    assert total == pytest.approx(expect)


def test_unavailable_components_fail_loudly_or_are_missing():
    with pytest.raises(ModelUnavailable) as err:
        RealReward.load(components=("text",))
    assert "\n" not in str(err.value) and "openai/clip-vit-base-patch32" in str(err.value)
    reward = RealReward.load(allow_missing=True)   # hub defaults are not cached here; dlib faces work offline
    assert reward.components == ("id",) and set(reward.missing) == {"text", "aes"}
    out = reward(RewardBatch(images=[Image.new("RGB", (64, 64))], prompts=["x"], references=[[]]))
    assert set(out.components) == {"id"} and out.components["id"] == [0.0]
    assert any(n.startswith("R_text unavailable") for n in out.notes)
    with pytest.raises(KeyError, match="text"):                 # never a made-up number for a missing component
        composite(out.components, {"text": 1.0, "id": 1.0})
    assert isinstance(reward.face, DlibBackend)


def test_object_reward_with_clip_embedder_and_masks(tiny):
    reward = RealReward.load(components=("id",), id_kind="object", id_model=str(tiny / "clip"))
    img, masks = scene(RED, BLUE)
    refs = [img.crop((60, 10, 90, 40)), img.crop((5, 20, 35, 50))]
    out = reward(RewardBatch(images=[img], prompts=["two squares"], references=[refs],
                             metadata=[{"masks": masks}]))
    assert out.components["id"][0] == pytest.approx(1.0, abs=1e-4)   # exact crops of the subjects
    emb = ClipScorer.load(str(tiny / "clip"), load_tokenizer=False).image_embeddings
    direct = subject_similarity(img, refs, emb, masks=masks).score
    assert out.components["id"][0] == pytest.approx(direct, abs=1e-6)


def test_object_mask_box_reads_01_masks_like_the_dataset():
    """A 0/1 mask (as SAM or a numpy pipeline hands it over) is a subject, not an empty mask."""
    from multicrafter import dataset_format, reference_crops
    from multicrafter.masks import as_bool_mask

    # one definition: the dataset reader and the reference crops read masks exactly as the metrics do
    assert dataset_format.as_bool_mask is as_bool_mask and reference_crops.as_bool_mask is as_bool_mask
    img, masks = scene(RED, BLUE)
    ones = (np.asarray(masks[0]) > 0).astype(np.uint8)   # values 0/1
    assert mask_box(ones, img.size) == (5, 20, 35, 50)
    assert mask_box(Image.fromarray(ones), img.size) == (5, 20, 35, 50)
    res = subject_similarity(img, [swatch(RED)], colour_embed, masks=[ones])
    assert res.crops == 1 and res.score == pytest.approx(1.0, abs=1e-5)


class CountingBackend:
    """A fake face backend: one face per non-black image, embedding = mean colour; counts detector calls."""

    name, scale = "fake", "cosine"

    def __init__(self):
        self.calls = 0

    def faces(self, image):
        from multicrafter.metrics.face_types import Face

        self.calls += 1
        arr = np.asarray(image, np.float64)
        return [] if arr.max() == 0 else [Face((0, 0, 8, 8), 1.0, arr.mean((0, 1)))]

    def similarity(self, a, b):
        s = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        return np.clip(s, 0, None), s


def test_reward_reference_faces_go_through_the_shared_cache():
    from multicrafter.metrics.face_sim import reference_faces

    backend = CountingBackend()
    reward = RealReward(face=backend)
    refs = [swatch(RED), Image.new("RGB", (20, 20))]   # the second has no face
    batch = RewardBatch(images=[swatch(RED)] * 3, prompts=["x"] * 3, references=[refs] * 3)
    out = reward(batch)
    assert out.components["id"] == pytest.approx([0.5] * 3)
    assert backend.calls == 3 + 2                      # 3 generated images, each distinct reference once
    assert sum("no face found in reference 1" in n for n in out.notes) == 3   # the note survives a cache hit
    direct = reference_faces(refs, backend)            # no cache: same answer, detected again
    cached = reference_faces(refs, backend, cache=reward._ref_cache)
    assert backend.calls == 5 + 2
    assert direct[1:] == cached[1:] == ([1, 0], ["no face found in reference 1: it scores 0"])


@pytest.mark.parametrize("components,setting", [(("text",), "reward.real.clip_model"),
                                                (("aes",), "reward.real.aes_head")])
def test_a_missing_reward_model_names_the_config_setting(components, setting, tmp_path, monkeypatch):
    """The reward is configured in the IPPO YAML, so its one-line message names the key there, not a CLI flag."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))   # an empty cache: nothing can be found
    with pytest.raises(ModelUnavailable) as err:
        RealReward.load(components=components)
    msg = str(err.value)
    assert f"{setting}=/path/to/" in msg and "--" not in msg and "\n" not in msg, msg
