"""Reference crops of one subject: an object cut out along its mask, a face cut around its detected face.

A reference is a square crop, so it packs like the target latents. The dataset writer makes a subject's reference
with these when none is given, the app and `python -m multicrafter.generate --kind face` feed face references through
`subject_reference`, so training data and generation see faces cropped the same way. Faces are found with dlib's HOG
detector, which ships inside dlib and works offline.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .io import load_image
from .masks import as_bool_mask, mask_box

__all__ = ["BACKGROUNDS", "detect_faces", "face_crop", "reference_crop", "square_box", "subject_reference"]

BACKGROUNDS = ("white", "black", "gray", "keep")
_FILL = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (127, 127, 127)}


def square_box(box: list[int] | tuple[int, ...], pad: float) -> tuple[int, int, int, int]:
    """A square around `box` enlarged by `pad` (fraction of its longer side); may extend past the image."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * pad)
    side = max(int(round(side)), 1)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    return left, top, left + side, top + side


def _crop_padded(img: Image.Image, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> Image.Image:
    """PIL crop that fills outside the image with `fill` rather than black."""
    canvas = Image.new(img.mode, (box[2] - box[0], box[3] - box[1]), fill if img.mode == "RGB" else 0)
    x0, y0 = max(0, -box[0]), max(0, -box[1])
    inner = img.crop((max(box[0], 0), max(box[1], 0), min(box[2], img.width), min(box[3], img.height)))
    canvas.paste(inner, (x0, y0))
    return canvas


def reference_crop(image: Any, mask: Any, pad: float = 0.1, background: str | tuple[int, int, int] = "white",
                   size: int | None = None) -> Image.Image:
    """Square crop around the masked subject; pixels outside the mask become `background` ("keep" leaves them)."""
    img = load_image(image)
    m = as_bool_mask(mask)
    if m.shape != (img.height, img.width):
        raise UserError(f"mask size {m.shape[1]}x{m.shape[0]} differs from image size {img.width}x{img.height}")
    box = mask_box(m)
    if box is None:
        raise UserError("cannot make a reference crop from an empty mask")
    if background != "keep" and not isinstance(background, tuple) and background not in _FILL:
        raise UserError(f"background must be one of {', '.join(BACKGROUNDS)} or an (r, g, b) tuple")
    fill = background if isinstance(background, tuple) else _FILL.get(background, (255, 255, 255))
    sq = square_box(box, pad)
    if background != "keep":
        arr = np.asarray(img).copy()
        arr[~m] = fill
        img = Image.fromarray(arr)
    crop = _crop_padded(img, sq, fill)
    return crop.resize((size, size), Image.Resampling.LANCZOS) if size else crop


def _face_detector() -> Any:
    try:
        import dlib  # optional dependency, needed only when a face is cropped; keeps importing this module light
    except ImportError as exc:
        raise UserError("face crops need dlib (pip install dlib-bin)") from exc
    return dlib.get_frontal_face_detector()


def detect_faces(image: Any, upsample: int = 1) -> list[list[int]]:
    """Face boxes [x0, y0, x1, y1] from dlib's HOG detector (ships inside dlib: works offline)."""
    arr = np.asarray(load_image(image))
    rects = _face_detector()(arr, upsample)
    return [[max(r.left(), 0), max(r.top(), 0), min(r.right(), arr.shape[1]), min(r.bottom(), arr.shape[0])]
            for r in rects]


def _overlap(a: list[int], b: list[int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return float(w * h)


def face_crop(image: Any, mask: Any = None, box: list[int] | None = None, pad: float = 0.4,
              size: int | None = None) -> Image.Image:
    """Square crop of the face belonging to the subject (the detected face overlapping its mask/box the most)."""
    img = load_image(image)
    faces = detect_faces(img)
    if not faces:
        raise UserError("no face found in the image; mark this subject as kind 'object' or crop it by hand")
    region = box if box is not None else (mask_box(mask) if mask is not None else None)
    if region is not None:
        best = max(faces, key=lambda f: _overlap(f, region))
        if _overlap(best, region) == 0:
            raise UserError("no detected face lies inside this subject's mask or box")
    else:
        best = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
    crop = _crop_padded(img, square_box(best, pad), (255, 255, 255))
    return crop.resize((size, size), Image.Resampling.LANCZOS) if size else crop


def subject_reference(image: Image.Image, kind: str = "object", pad: float = 0.4) -> tuple[Image.Image, str | None]:
    """What a reference image of one subject is fed as: a face subject is cropped to its largest face (as the
    training data's face references are), an object is used whole. Returns (image, note); when no face is found the
    whole image is kept and the note says so. One rule for the app and the CLI."""
    if kind != "face":
        return image, None
    try:
        return face_crop(image, pad=pad), None
    except UserError as exc:
        return image, f"{exc}; using the whole image"
