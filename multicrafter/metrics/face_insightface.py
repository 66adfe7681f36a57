"""The ArcFace backend: insightface's SCRFD detector + ArcFace recogniser from a local buffalo_l/antelopev2 folder.

insightface downloads its models at run time, which cannot work offline, so this backend only reads ONNX files
already on disk and never calls the downloader. Point it at the unpacked model folder itself, or at a root that
holds `<name>/` or `models/<name>/` (insightface's own `~/.insightface/models/buffalo_l` layout).

Similarity scale: cosine of the 512-d ArcFace embeddings (the paper's Face-Sim: ≈0.4–0.8 for the same person in
different photos, ≈0 for strangers), clipped at 0 so a stranger never scores below a missing face. The raw cosine
is kept in every match report.

`detector="dlib"` replaces SCRFD with dlib's HOG detector and 68-point landmarks (converted to ArcFace's five:
eye centres, nose tip, mouth corners), for folders that only hold a recognition model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .face_types import Face, dlib_model_dir, hog_detect, prepare_rgb, too_small
from .loading import ModelUnavailable

PROVIDERS = ["CPUExecutionProvider"]


def find_model_folder(root: str | os.PathLike | None, name: str) -> Path:
    """The folder holding the pack's *.onnx files; ModelUnavailable (one line) if none is on disk."""
    base = Path(root).expanduser() if root else Path("~/.insightface").expanduser()
    for cand in (base, base / name, base / "models" / name):
        if cand.is_dir() and any(cand.glob("*.onnx")):
            return cand
    raise ModelUnavailable(
        f"insightface model pack '{name}' not found under {base} (insightface downloads models at run time, which "
        f"is impossible offline); unpack {name} (e.g. buffalo_l.zip) into a folder and pass --insightface-root DIR")


class InsightFaceBackend:
    """SCRFD (or dlib) detection with 5 keypoints → ArcFace-aligned crop → L2-normalised embedding."""

    name = "insightface"
    scale = "cosine of ArcFace embeddings, clipped at 0 (0 = different person)"

    def __init__(self, root: str | os.PathLike | None = None, model_name: str = "buffalo_l",
                 det_threshold: float = 0.5, det_size: int = 640, detector: str = "scrfd", max_side: int = 1600,
                 **_: Any) -> None:
        if detector not in ("scrfd", "dlib"):
            raise ValueError(f"unknown insightface detector '{detector}' (expected scrfd or dlib)")
        folder = find_model_folder(root, model_name)
        try:
            from insightface.model_zoo import get_model  # optional dependency (and onnxruntime): only for this backend
        except ImportError:
            raise ModelUnavailable("the insightface backend needs the insightface package") from None
        self.det = self.rec = None
        for path in sorted(folder.glob("*.onnx")):
            try:
                model = get_model(str(path), providers=PROVIDERS)
            except Exception as exc:  # noqa: BLE001 - a broken file is a user problem, reported in one line
                raise ModelUnavailable(f"cannot load {path.name} from {folder}: {type(exc).__name__}") from None
            task = getattr(model, "taskname", None)
            if task == "detection" and self.det is None:
                self.det = model
            elif task == "recognition" and self.rec is None:
                self.rec = model
        if self.rec is None:
            raise ModelUnavailable(f"no ArcFace recognition model (e.g. w600k_r50.onnx) in {folder}")
        if detector == "scrfd" and self.det is None:
            raise ModelUnavailable(f"no SCRFD detection model (e.g. det_10g.onnx) in {folder}; "
                                   f"add one or use the dlib detector")
        if detector == "scrfd":
            self.det.prepare(-1, input_size=(det_size, det_size), det_thresh=det_threshold)
        self.rec.prepare(-1)
        self.detector = detector
        self.det_size = int(det_size)
        self.det_threshold = float(det_threshold)
        self.max_side = int(max_side)
        self.folder = folder
        self._hog: Any = None
        if detector == "dlib":
            import dlib  # optional dependency, needed only for detector="dlib"

            self._hog = dlib.get_frontal_face_detector()
            self._sp68 = dlib.shape_predictor(str(dlib_model_dir() / "shape_predictor_68_face_landmarks.dat"))

    def keypoints(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 5) boxes+score and (n, 5, 2) ArcFace keypoints on an RGB array."""
        if self.detector == "scrfd":
            bgr = np.ascontiguousarray(arr[..., ::-1])
            boxes, kps = self.det.detect(bgr, input_size=(self.det_size, self.det_size), max_num=0)
            if kps is None:
                raise ModelUnavailable(f"the detection model in {self.folder} gives no keypoints (need a *_kps model)")
            return boxes, kps
        rows, pts = [], []
        for rect, score in hog_detect(self._hog, arr, 0.0, None):
            p = np.array([[q.x, q.y] for q in self._sp68(arr, rect).parts()], dtype=np.float32)
            pts.append(np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]))
            rows.append([rect.left(), rect.top(), rect.right(), rect.bottom(), score])
        return np.asarray(rows, np.float32).reshape(-1, 5), np.asarray(pts, np.float32).reshape(-1, 5, 2)

    def faces(self, image: Any) -> list[Face]:
        """Every face of the image with its L2-normalised ArcFace embedding, best first; boxes in the input's pixels."""
        from insightface.utils.face_align import norm_crop  # optional dependency: only for this backend

        arr, scale = prepare_rgb(image, self.max_side)
        if too_small(arr):
            return []
        boxes, kps = self.keypoints(arr)
        if len(boxes) == 0:
            return []
        bgr = np.ascontiguousarray(arr[..., ::-1])
        crops = [norm_crop(bgr, landmark=k, image_size=self.rec.input_size[0]) for k in kps]
        emb = np.asarray(self.rec.get_feat(crops), dtype=np.float64).reshape(len(crops), -1)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        out = [Face(box=tuple(float(v) * scale for v in b[:4]), score=float(b[4]), embedding=e)
               for b, e in zip(boxes, emb)]
        return sorted(out, key=lambda f: -f.score)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine clipped to [0, 1], raw cosine) between two sets of normalised embeddings."""
        cos = a @ b.T
        return np.clip(cos, 0.0, 1.0), cos
