"""The paper's image metrics as one table row: CLIP-T, CLIP-I, DINO-I, AES (Face-Sim lives in `faces`).

Models are loaded once; a metric whose weights are not on this machine is reported as missing (None) with the
one-line reason, never as a number. CLIP-I and DINO-I here compare the whole generated image with each reference
(the DreamBench form); for per-subject crops use `objects.subject_similarity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from .aesthetic import AestheticScorer
from .clip import ClipScorer
from .defaults import (
    DEFAULT_AES_CLIP,
    DEFAULT_AES_FILE,
    DEFAULT_AES_HEAD,
    DEFAULT_CLIP,
    DEFAULT_DINO,
    IMAGE_METRICS,
    LABELS,
)
from .dino import DinoScorer
from .loading import ModelUnavailable

__all__ = ["IMAGE_METRICS", "LABELS", "MetricModels", "image_metrics", "load_metric_models"]


@dataclass
class MetricModels:
    """The scorers one table row needs; a metric whose weights are not available is None, its reason in `missing`."""

    clip: ClipScorer | None = None
    dino: DinoScorer | None = None
    aes: AestheticScorer | None = None
    wanted: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)   # metric → one-line reason


def load_metric_models(names: Sequence[str], clip_model: str = DEFAULT_CLIP, dino_model: str = DEFAULT_DINO,
                       aes_clip: str = DEFAULT_AES_CLIP, aes_head: str = DEFAULT_AES_HEAD,
                       aes_head_file: str = DEFAULT_AES_FILE, device: str = "cpu") -> MetricModels:
    """Load what `names` need; unavailable weights become `missing` entries instead of errors."""
    unknown = set(names) - set(IMAGE_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)} (known: {', '.join(IMAGE_METRICS)})")
    m = MetricModels(wanted=tuple(n for n in IMAGE_METRICS if n in names))
    if {"clip_t", "clip_i"} & set(names):
        try:
            m.clip = ClipScorer.load(clip_model, device=device)
        except ModelUnavailable as exc:
            m.missing.update({n: str(exc) for n in ("clip_t", "clip_i") if n in names})
    if "dino_i" in names:
        try:
            m.dino = DinoScorer.load(dino_model, device=device)
        except ModelUnavailable as exc:
            m.missing["dino_i"] = str(exc)
    if "aes" in names:
        try:
            clip = m.clip if m.clip is not None and aes_clip == clip_model else aes_clip
            m.aes = AestheticScorer.load(clip, aes_head, aes_head_file, device=device)
        except ModelUnavailable as exc:
            m.missing["aes"] = str(exc)
    return m


def image_metrics(models: MetricModels, images: Sequence[Image.Image], prompts: Sequence[str],
                  references: Sequence[Sequence[Image.Image]]) -> dict[str, list[float] | None]:
    """Per-image values for each wanted metric; None for a missing one."""
    out: dict[str, list[float] | None] = {n: None for n in models.wanted}
    if "clip_t" in out and models.clip is not None:
        out["clip_t"] = models.clip.clip_t(images, prompts)
    if "clip_i" in out and models.clip is not None:
        out["clip_i"] = models.clip.clip_i(images, references)
    if "dino_i" in out and models.dino is not None:
        out["dino_i"] = models.dino.dino_i(images, references)
    if "aes" in out and models.aes is not None:
        out["aes"] = models.aes.score(images)
    return out
