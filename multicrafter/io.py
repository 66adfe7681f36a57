"""Small, safe file helpers shared by every writer: atomic writes and careful image loading."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

MAX_IMAGE_PIXELS = 64_000_000  # larger files are refused rather than risking memory (decompression bombs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Swap a fully written folder `src` in as `dst`; an existing `dst` is moved aside first and then deleted, so the
    name never points at a half-written folder (the folder-level counterpart of `atomic_write_bytes`)."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to write into: swapped in as `target` (`replace_dir`) when the block
    ends, deleted when it raises, so `target` is never a half-written folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_image_atomic(image: Image.Image, path: str | os.PathLike, pnginfo: Any = None) -> None:
    """Save a PIL image atomically (format from the suffix, PNG by default)."""
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(Path(path).suffix.lower(), "PNG")
    image.save(buf, format=fmt, pnginfo=pnginfo) if fmt == "PNG" else image.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


def load_image(source: Any, mode: str = "RGB", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load a PIL image from a path, PIL image or numpy array and convert it to `mode`.

    Raises UserError with one line for a missing, unreadable, corrupt or too large image.
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if arr.ndim not in (2, 3):
            raise UserError(f"image array must be HxW or HxWxC, got shape {tuple(arr.shape)}")
        img = Image.fromarray(arr)
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise UserError(f"image not found: {p}")
        if p.is_dir():
            raise UserError(f"expected an image file, got a folder: {p}")
        try:
            img = Image.open(p)
            if img.width * img.height > max_pixels:
                raise UserError(f"image too large ({img.width}x{img.height} > {max_pixels} pixels): {p}")
            img.load()
        except UserError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"cannot read image {p.name}: not a valid image file ({type(exc).__name__})") from None
    else:
        raise UserError(f"unsupported image input of type {type(source).__name__}")
    if img.width * img.height > max_pixels:
        raise UserError(f"image too large ({img.width}x{img.height} > {max_pixels} pixels)")
    if img.mode != mode:
        if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert(mode)
    return img
