"""Attention maps drawn over the generated image: one heat-map overlay per subject, and a figure of all of them."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import atomic_write_bytes


def overlay(image: Image.Image, amap: torch.Tensor | np.ndarray, alpha: float = 0.55, cmap: str = "jet") -> Image.Image:
    """Blend one (h, w) map in [0, 1] over the image, upsampled to the image size."""
    import matplotlib  # plotting only: keeps matplotlib out of the start-up of everything importing this module

    m = np.asarray(amap.detach().cpu() if isinstance(amap, torch.Tensor) else amap, dtype=np.float32)
    m = np.clip(m / (m.max() + 1e-8), 0, 1)
    heat = matplotlib.colormaps[cmap](m)[..., :3]
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat_img, alpha)


def attention_figure(image: Image.Image, maps: torch.Tensor, names: Sequence[str] | None = None,
                     title: str | None = None) -> Image.Image:
    """A matplotlib figure: the image, then each subject's map overlaid on it. Returns a PIL image."""
    # plotting only: matplotlib stays out of the start-up of everything importing this module
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot): no global state, safe from the app's worker threads.
    n = maps.shape[0]
    names = list(names or [f"subject {i + 1}" for i in range(n)])
    fig = Figure(figsize=(2.6 * (n + 1), 2.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n + 1)
    axes[0].imshow(image)
    axes[0].set_title("image")
    for i in range(n):
        axes[i + 1].imshow(overlay(image, maps[i]))
        axes[i + 1].set_title(names[i] if i < len(names) else f"subject {i + 1}")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def save_attention_figure(image: Image.Image, maps: torch.Tensor, path: str | Path,
                          names: Sequence[str] | None = None) -> None:
    """Write `attention_figure(image, maps, names)` as a PNG, atomically."""
    fig = attention_figure(image, maps, names)
    buf = io.BytesIO()
    fig.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
