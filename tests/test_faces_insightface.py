"""insightface backend: local-folder loading, the offline error, and the ArcFace recognition path on a tiny ONNX
recogniser exported here (no real insightface weights exist on this machine).

`torch.onnx.export`'s default (dynamo) exporter needs the `onnxscript` package, which is not installed, so the tiny
net is exported with the TorchScript exporter (`dynamo=False`).
"""

from __future__ import annotations

import os
import warnings

import insightface
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from multicrafter.metrics.face_insightface import InsightFaceBackend
from multicrafter.metrics.face_registry import get_backend
from multicrafter.metrics.face_sim import face_similarity, match_faces
from multicrafter.metrics.loading import ModelUnavailable

T1 = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")


def export_tiny_arcface(path) -> None:
    """A small conv net with ArcFace's interface: input 'data' (N, 3, 112, 112) → (N, 512)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(5), nn.Flatten(), nn.Linear(400, 512)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 112, 112), str(path), input_names=["data"], output_names=["fc1"],
                          dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}}, dynamo=False)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """Lay the model out as insightface does: ROOT/models/<name>/*.onnx."""
    root = tmp_path_factory.mktemp("insightface")
    folder = root / "models" / "tinypack"
    folder.mkdir(parents=True)
    export_tiny_arcface(folder / "w600k_tiny.onnx")
    return root


@pytest.fixture(scope="module")
def backend(pack):
    return InsightFaceBackend(root=pack, model_name="tinypack", detector="dlib")


def test_offline_without_models_is_one_clear_line(tmp_path):
    with pytest.raises(ModelUnavailable) as err:
        get_backend("insightface", root=tmp_path, model_name="buffalo_l")
    msg = str(err.value)
    assert "\n" not in msg and "buffalo_l" in msg and "--insightface-root" in msg and "offline" in msg


def test_pack_without_detector_says_so(pack):
    with pytest.raises(ModelUnavailable, match="no SCRFD detection model .* dlib detector"):
        InsightFaceBackend(root=pack, model_name="tinypack")
    assert isinstance(InsightFaceBackend(root=pack / "models" / "tinypack", detector="dlib"), InsightFaceBackend)


def test_broken_onnx_file_is_one_line(tmp_path):
    (tmp_path / "rec.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelUnavailable, match="cannot load rec.onnx"):
        InsightFaceBackend(root=tmp_path, detector="dlib")


def test_recognition_path_embeds_aligned_faces(backend):
    group = Image.open(T1).convert("RGB")
    faces = backend.faces(group)
    assert len(faces) == 6
    emb = np.stack([f.embedding for f in faces])
    assert emb.shape == (6, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    # Alignment follows the keypoints: shifting the whole photo leaves every aligned crop (and embedding) unchanged.
    shifted = Image.new("RGB", (group.width + 40, group.height + 24))
    shifted.paste(group, (40, 24))
    moved = backend.faces(shifted)
    res = match_faces(moved, faces, backend)
    assert len(res.matches) == 6
    for m in res.matches:
        assert m["raw"] > 0.995   # different faces give <= 0.98 even with this random net
        x0 = faces[m["reference"]].box[0]
        assert abs(m["box"][0] - (x0 + 40)) < 20         # the same person, 40 px to the right (faces are 100s apart)
    assert res.face_sim > 0.99


def test_similarity_is_clipped_cosine(backend):
    a = np.eye(3, 512)
    b = np.stack([a[0], -a[1], (a[0] + a[2]) / np.sqrt(2)])
    sim, raw = backend.similarity(a, b)
    assert np.allclose(raw, a @ b.T)
    assert sim.min() >= 0 and sim[1, 1] == 0 and np.isclose(sim[0, 0], 1) and np.isclose(sim[2, 2], 2 ** -0.5)


def test_no_face_and_tiny_image(backend):
    ref = Image.open(T1).convert("RGB").crop((0, 200, 300, 500))
    res = face_similarity(Image.new("RGB", (256, 256), (30, 90, 200)), [ref], backend)
    assert res.face_sim == 0 and res.faces_detected == 0 and res.reference_faces == [1]
    assert backend.faces(Image.new("RGB", (8, 8))) == []
