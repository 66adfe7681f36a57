"""Shared inputs for the app tests: ToyWorld references/masks, a small random adapter folder, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

STEPS = 2
SIZE = 64


def toy_refs(folder: Path, n: int = 2) -> tuple[list[str], list[str], str]:
    """(reference paths, mask paths, prompt) of a ToyWorld scene with n subjects."""
    from multicrafter.toyworld import build_sample

    folder.mkdir(parents=True, exist_ok=True)
    s = build_sample(1, 0, split="test", size=SIZE, ref_size=32, n_subjects=n)
    refs, masks = [], []
    for k, (ref, mask) in enumerate(zip(s.references, s.masks)):
        refs.append(str(folder / f"ref{k}.png"))
        masks.append(str(folder / f"mask{k}.png"))
        Image.fromarray(ref).save(refs[-1])
        Image.fromarray(np.asarray(mask, np.uint8) * 255).save(masks[-1])
    scene = folder / "scene.png"
    Image.fromarray(s.image).save(scene)
    return refs, masks, s.prompt


def random_adapter(folder: Path) -> Path:
    """A LoRA adapter for the tiny model with non-zero B, so switching it off changes the image."""
    from multicrafter import presets
    from multicrafter.adapters import AdapterConfig, add_adapter, save_adapter

    transformer = presets.build_tiny_components()["transformer"]
    add_adapter(transformer, AdapterConfig(lora_rank=4, lora_alpha=4.0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(transformer, folder)
    return folder


def corrupt_png(path: Path) -> str:
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return str(path)


def scene_image(path: Path, size: int = 96) -> str:
    """A plain image with one square 'subject' (for clicks and GrabCut)."""
    arr = np.full((size, size, 3), 230, np.uint8)
    arr[size // 4: size * 3 // 4, size // 4: size * 3 // 4] = (200, 30, 30)
    Image.fromarray(arr).save(path)
    return str(path)
