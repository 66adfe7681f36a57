"""Generation parameters embedded in the PNGs the CLI and the app write (JSON text under the key `multicrafter`),
so an image says how it was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .io import save_image_atomic

META_KEY = "multicrafter"


def save_generation(image: Image.Image, path: str | Path, params: dict[str, Any]) -> None:
    """Save a PNG with its generation parameters as JSON text metadata (key `multicrafter`), atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text(META_KEY, json.dumps(params, default=str, sort_keys=True))
    save_image_atomic(image, path, pnginfo=info)


def read_generation_params(path: str | Path) -> dict[str, Any]:
    """The generation parameters `save_generation` embedded in a PNG ({} when it has none)."""
    with Image.open(path) as im:
        return json.loads(im.text.get(META_KEY, "{}"))
