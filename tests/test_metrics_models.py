"""CLIP-T / CLIP-I / DINO-I / AES on tiny random checkpoints saved to disk and loaded through the real loading code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from multicrafter.errors import UserError
from multicrafter.metrics.aesthetic import AestheticHead, AestheticScorer, load_head
from multicrafter.metrics.clip import ClipScorer
from multicrafter.metrics.dino import DinoScorer
from multicrafter.metrics.loading import ModelUnavailable
from multicrafter.metrics.preprocess import CLIP_MEAN, CLIP_STD, clip_default

PROJ = 8


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[]), len(vocab)


def build_tiny_clip(path) -> None:
    """Save a random CLIP (projection dim PROJ, 32 px images, 16 text positions) and its tokenizer to `path`."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok, n_vocab = _tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=PROJ)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    build_tiny_clip(path)
    return path


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipScorer.load(str(clip_dir), batch_size=2)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (32, 32), (64, 20), (25, 50), (33, 47)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 5][1], sizes[i % 5][0], 3), dtype=np.uint8))
            for i in range(n)]


def test_preprocess_resize_crop_normalise():
    pre = clip_default(32)
    x = pre([Image.new("RGB", (64, 40), (255, 255, 255)), Image.new("L", (10, 90), 0)])
    assert x.shape == (2, 3, 32, 32)
    white = (1 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    assert np.allclose(x[0].mean(dim=(1, 2)).numpy(), white, atol=1e-5)
    assert np.allclose(x[1].mean(dim=(1, 2)).numpy(), -np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD), atol=1e-5)


def test_clip_embeddings_shapes_norms_and_batching(clip, clip_dir):
    imgs = _images(5)
    emb = clip.image_embeddings(imgs)
    assert emb.shape == (5, PROJ)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    one_batch = ClipScorer.load(str(clip_dir), batch_size=16).image_embeddings(imgs)
    assert torch.allclose(emb, one_batch, atol=1e-5)
    assert clip.image_embeddings([]).shape == (0, PROJ)
    txt = clip.text_embeddings(["a cat", "a dog", "b"])
    assert txt.shape == (3, PROJ) and torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_clip_t_is_the_cosine_of_model_features(clip):
    imgs, prompts = _images(3), ["a red cat", "two dogs", "x"]
    scores = clip.clip_t(imgs, prompts)
    assert len(scores) == 3 and all(-1 <= s <= 1 for s in scores)
    with torch.no_grad():
        px = clip.preprocess(imgs)
        tok = clip.tokenizer(prompts, padding=True, return_tensors="pt")
        i = clip.model.get_image_features(pixel_values=px).pooler_output
        t = clip.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
    manual = torch.nn.functional.cosine_similarity(i, t).tolist()
    assert np.allclose(scores, manual, atol=1e-5)
    with pytest.raises(ValueError):
        clip.clip_t(imgs, prompts[:2])


def test_clip_t_truncates_long_prompts(clip):
    long = "a " * 200 + "cat"
    [score] = clip.clip_t(_images(1), [long])
    assert -1 <= score <= 1
    assert clip.text_embeddings([long]).shape == (1, PROJ)


def test_clip_i_identity_and_missing_references(clip):
    imgs = _images(3)
    scores = clip.clip_i(imgs, [[imgs[0]], [imgs[1], imgs[1]], []])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] == pytest.approx(1.0, abs=1e-5)
    assert scores[2] == 0.0
    other = clip.clip_i([imgs[0]], [[imgs[1], imgs[2]]])[0]
    e = clip.image_embeddings(imgs)
    assert other == pytest.approx(float((e[1] @ e[0] + e[2] @ e[0]) / 2), abs=1e-5)


def test_preprocessor_config_in_folder_is_used(tmp_path, clip_dir):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 48}, "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.5, 0.5, 0.5], "resample": 2}))
    pre = ClipScorer.load(str(folder)).preprocess
    assert pre.resize == 48 and pre.crop == (32, 32) and pre.mean == (0.5, 0.5, 0.5) and pre.resample == 2


def test_hub_id_offline_is_one_clear_line():
    with pytest.raises(ModelUnavailable) as err:
        ClipScorer.load("openai/clip-vit-base-patch32")
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert msg == ("CLIP (openai/clip-vit-base-patch32) is not available offline: run once online or pass "
                   "--clip-model /path/to/folder")


@pytest.mark.parametrize("bad", ["/nonexistent/clip", "./no/such/folder"])
def test_missing_folder_is_unavailable(bad):
    with pytest.raises(ModelUnavailable, match="no such folder"):
        ClipScorer.load(bad)


def test_folder_without_config_is_unavailable(tmp_path):
    with pytest.raises(ModelUnavailable, match="config.json"):
        DinoScorer.load(str(tmp_path))


@pytest.fixture(scope="module", params=["vit", "dinov2"])
def dino(request, tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                  patch_size=8)
    model = ViTModel(ViTConfig(**common), add_pooling_layer=False) if request.param == "vit" else \
        Dinov2Model(Dinov2Config(**common))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return DinoScorer.load(str(path), batch_size=3)


def test_dino_embeddings_and_dino_i(dino):
    imgs = _images(5, seed=1)
    emb = dino.image_embeddings(imgs)
    assert emb.shape == (5, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    with torch.no_grad():
        cls = dino.model(pixel_values=dino.preprocess(imgs)).last_hidden_state[:, 0]
    assert torch.allclose(emb, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)  # batching is invisible
    s = dino.dino_i(imgs[:2], [[imgs[0]], [imgs[0], imgs[1]]])
    assert s[0] == pytest.approx(1.0, abs=1e-5) and -1 <= s[1] < 1.0


def test_dino_hub_id_offline():
    with pytest.raises(ModelUnavailable, match="DINO .facebook/dino-vits16. is not available offline.*--dino-model"):
        DinoScorer.load()


def _laion_head(dim: int) -> nn.Sequential:
    """Same layer layout (and state-dict keys layers.0/2/4/6/7) as LAION's improved aesthetic predictor."""
    return nn.Sequential(nn.Linear(dim, 16), nn.Dropout(0.2), nn.Linear(16, 8), nn.Dropout(0.2), nn.Linear(8, 4),
                         nn.Dropout(0.1), nn.Linear(4, 2), nn.Linear(2, 1))


def test_aesthetic_head_matches_laion_layout(tmp_path, clip, clip_dir):
    seq = _laion_head(PROJ).eval()
    torch.save({f"layers.{k}": v for k, v in seq.state_dict().items()}, tmp_path / "aesthetic-model.pth")
    aes = AestheticScorer.load(clip=str(clip_dir), head=str(tmp_path))     # folder + default filename
    imgs = _images(4, seed=2)
    scores = aes.score(imgs)
    assert len(scores) == 4 and all(np.isfinite(scores))
    with torch.no_grad():
        expect = seq(clip.image_embeddings(imgs)).squeeze(-1).tolist()
    assert np.allclose(scores, expect, atol=1e-5)
    assert aes.score([]) == []
    shared = AestheticScorer.load(clip=clip, head=str(tmp_path / "aesthetic-model.pth"))
    assert np.allclose(shared.score(imgs), scores, atol=1e-5)


def test_linear_head_and_safetensors(tmp_path, clip):
    from safetensors.torch import save_file

    lin = nn.Linear(PROJ, 1)
    save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, str(tmp_path / "h.safetensors"))
    head = load_head(tmp_path / "h.safetensors")
    x = torch.randn(3, PROJ)
    assert torch.allclose(head(x), lin(x).squeeze(-1), atol=1e-6)
    with pytest.raises(ValueError, match="expects 4-d"):
        AestheticScorer(clip, AestheticHead.from_state_dict(nn.Linear(4, 1).state_dict()))


def test_aesthetic_unavailable_and_corrupt_head(tmp_path, clip):
    with pytest.raises(ModelUnavailable, match="trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth. is not available "
                       "offline: run once online or pass --aes-head /path/to/aesthetic-model.pth"):
        AestheticScorer.load(clip=clip)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match="bad.pth is unreadable"):
        AestheticScorer.load(clip=clip, head=str(tmp_path / "bad.pth"))
    with pytest.raises(ModelUnavailable, match="no such file"):
        AestheticScorer.load(clip=clip, head=str(tmp_path / "missing.pth"))


def test_hub_id_already_in_the_cache_loads_offline(tmp_path, clip_dir, monkeypatch):
    """A hub id works offline when the Hugging Face cache holds it (snapshot layout written by hand here)."""
    from tests.hub_cache import place_in_hub_cache, use_hub_cache

    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    place_in_hub_cache(cache, "tiny-org/tiny-clip", clip_dir)
    (tmp_path / "aes").mkdir()
    torch.save({f"layers.{k}": v for k, v in _laion_head(PROJ).state_dict().items()}, tmp_path / "aes" / "h.pth")
    place_in_hub_cache(cache, "tiny-org/aes", tmp_path / "aes")
    scorer = ClipScorer.load("tiny-org/tiny-clip")
    local = ClipScorer.load(str(clip_dir))
    imgs = _images(2)
    assert torch.allclose(scorer.image_embeddings(imgs), local.image_embeddings(imgs))
    assert AestheticScorer.load(clip=scorer, head="tiny-org/aes", head_filename="h.pth").head.in_features == PROJ
    with pytest.raises(ModelUnavailable, match="CLIP .tiny-org/other. is not available offline"):
        ClipScorer.load("tiny-org/other")


class _Recorder:
    """Stands in for a transformers class: records the from_pretrained call, then fails like the hub would."""

    calls: list = []
    error: Exception = OSError("x is not a local folder and is not a valid model identifier")

    @classmethod
    def from_pretrained(cls, src, **kwargs):
        cls.calls.append((src, kwargs))
        raise cls.error


def _online(monkeypatch):
    from multicrafter.metrics import loading

    monkeypatch.setattr(loading, "is_offline_mode", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return loading


def test_hub_ids_download_on_first_use_unless_hf_hub_offline(monkeypatch):
    """Online, a hub id is the plain from_pretrained call (local_files_only=False: the libraries download it);
    HF_HUB_OFFLINE=1, read at call time, turns the same call into a cache-only one. No network is touched here."""
    loading = _online(monkeypatch)
    assert loading.hub_kwargs() == {"local_files_only": False}
    _Recorder.calls = []
    with pytest.raises(ModelUnavailable) as err:
        loading.load_pretrained(_Recorder, "org/new", "CLIP", "--clip-model", dtype="x")
    assert _Recorder.calls == [("org/new", {"local_files_only": False, "dtype": "x"})]
    assert str(err.value) == ("CLIP (org/new) could not be downloaded (OSError: x is not a local folder and is not a "
                              "valid model identifier); check the id, or pass --clip-model /path/to/folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_kwargs() == {"local_files_only": True}
    with pytest.raises(ModelUnavailable, match=r"^CLIP \(org/new\) is not available offline: run once online"):
        loading.load_pretrained(_Recorder, "org/new", "CLIP", "--clip-model")
    assert _Recorder.calls[-1] == ("org/new", {"local_files_only": True})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert loading.hub_kwargs() == {"local_files_only": True}


def test_online_without_a_connection_says_offline(monkeypatch):
    """No network while HF_HUB_OFFLINE is unset: the hub library's connection error reads as 'not available offline'."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    loading = _online(monkeypatch)
    monkeypatch.setattr(_Recorder, "error", OSError("We couldn't reach the Hub"))
    _Recorder.error.__cause__ = LocalEntryNotFoundError("cannot find the requested files in the local cache")
    with pytest.raises(ModelUnavailable, match=r"^DINO \(org/dino\) is not available offline: .*--dino-model"):
        loading.load_pretrained(_Recorder, "org/dino", "DINO", "--dino-model")


def test_annotate_models_follow_the_same_rule(monkeypatch):
    """SAM 2 and Florence-2 load through the same call: online it is a download (local_files_only=False)."""
    import transformers

    from annotate import florence, sam2

    assert issubclass(sam2.Sam2Unavailable, ModelUnavailable)
    assert issubclass(florence.FlorenceUnavailable, ModelUnavailable)
    _online(monkeypatch)
    _Recorder.calls = []
    monkeypatch.setattr(transformers, "Sam2Model", _Recorder)
    monkeypatch.setattr(transformers, "Florence2ForConditionalGeneration", _Recorder)
    with pytest.raises(sam2.Sam2Unavailable, match="SAM 2 .facebook/sam2.1-hiera-tiny. could not be downloaded"):
        sam2.load_sam2()
    with pytest.raises(florence.FlorenceUnavailable, match="MULTICRAFTER_FLORENCE=/path/to/folder"):
        florence.FlorenceGrounder.from_pretrained()
    assert [(src, kw["local_files_only"]) for src, kw in _Recorder.calls] == [
        (sam2.DEFAULT_SAM2, False), (florence.DEFAULT_FLORENCE, False)]
