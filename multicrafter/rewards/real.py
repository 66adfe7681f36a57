"""The IPPO reward on real images: R_text = CLIP-T, R_aes = LAION AES, R_id = Hungarian Face-Sim or object ID-Sim.

Components are loaded up front. A component whose weights are not on this machine raises `ModelUnavailable` (one
line) at construction, or, with `allow_missing=True`, is left out and listed in `missing`; it never returns a
made-up number (`composite` then refuses a non-zero weight for it). Scales are the metrics' own: CLIP-T a cosine
(≈0.2–0.35), AES the LAION 1–10 rating, R_id in [0, 1]; choose weights accordingly (GSPO normalises advantages
per prompt group, so only the relative weights matter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from ..metrics.aesthetic import DEFAULT_AES_CLIP, DEFAULT_AES_FILE, DEFAULT_AES_HEAD, AestheticScorer
from ..metrics.clip import DEFAULT_CLIP, ClipScorer
from ..metrics.dino import DEFAULT_DINO, DinoScorer
from ..metrics.face_registry import get_backend
from ..metrics.face_sim import RefCache, match_faces, reference_faces
from ..metrics.face_types import FaceBackend
from ..metrics.loading import ModelUnavailable
from ..metrics.objects import Embed, subject_similarity
from .base import RewardBatch, RewardOutput

# The reward is configured in the IPPO config's `reward.real` section: a missing model's one-line message names the
# setting there (e.g. "pass reward.real.clip_model=/path/to/folder").
CONFIG = "reward.real"


class RealReward:
    """A `RewardFn`: call it with a RewardBatch, get {"text", "aes", "id"} lists for the components it has."""

    def __init__(self, text: ClipScorer | None = None, aes: AestheticScorer | None = None,
                 face: FaceBackend | None = None, subject: Embed | None = None,
                 missing: dict[str, str] | None = None) -> None:
        if face is not None and subject is not None:
            raise ValueError("R_id is either faces or object subjects, not both")
        self.text, self.aes, self.face, self.subject = text, aes, face, subject
        self.missing = dict(missing or {})
        self._ref_cache: RefCache = {}   # reference faces, detected and embedded once per distinct image

    @property
    def components(self) -> tuple[str, ...]:
        """The components this reward can compute (those whose models loaded)."""
        have = {"text": self.text, "aes": self.aes, "id": self.face or self.subject}
        return tuple(k for k, v in have.items() if v is not None)

    @classmethod
    def load(cls, components: Sequence[str] = ("text", "aes", "id"), clip_model: str = DEFAULT_CLIP,
             aes_clip: str = DEFAULT_AES_CLIP, aes_head: str = DEFAULT_AES_HEAD, aes_head_file: str = DEFAULT_AES_FILE,
             id_kind: str = "face", face_backend: str = "dlib", face_kwargs: dict[str, Any] | None = None,
             id_model: str = DEFAULT_DINO, allow_missing: bool = False, device: str = "cpu") -> RealReward:
        """Load the named components; `id_kind` is "face" (Face-Sim, dlib or insightface) or "object"
        (DINO-I on mask crops; `id_model` may also be a CLIP checkpoint for CLIP-I)."""
        unknown = set(components) - {"text", "aes", "id"}
        if unknown or id_kind not in ("face", "object"):
            raise ValueError(f"unknown reward components {sorted(unknown)} or id_kind '{id_kind}'")
        parts: dict[str, Any] = {}
        missing: dict[str, str] = {}

        def attempt(name: str, build: Callable[[], Any]) -> None:
            try:
                parts[name] = build()
            except ModelUnavailable as exc:
                if not allow_missing:
                    raise
                missing[name] = str(exc)

        if "text" in components:
            attempt("text", lambda: ClipScorer.load(clip_model, device=device, option=f"{CONFIG}.clip_model"))
        if "aes" in components:
            shared = parts.get("text") if aes_clip == clip_model else None
            attempt("aes", lambda: AestheticScorer.load(shared or aes_clip, aes_head, aes_head_file, device=device,
                                                        options=(f"{CONFIG}.aes_clip", f"{CONFIG}.aes_head")))
        if "id" in components and id_kind == "face":
            attempt("face", lambda: get_backend(face_backend, **(face_kwargs or {})))
        elif "id" in components:
            attempt("subject", lambda: _object_embedder(id_model, device))
        return cls(parts.get("text"), parts.get("aes"), parts.get("face"), parts.get("subject"),
                   {("id" if k in ("face", "subject") else k): v for k, v in missing.items()})

    def _id(self, i: int, image: Image.Image, refs: Sequence[Image.Image], meta: dict[str, Any]) -> tuple[float, list]:
        """R_id of one image; any failure of a detector or embedder scores 0 with a note (never the whole group)."""
        try:
            return self._id_unguarded(i, image, refs, meta)
        except Exception as exc:  # noqa: BLE001 - one bad image must not zero its whole group
            return 0.0, [f"sample {i}: R_id failed ({type(exc).__name__}: {str(exc)[:120]}), scored 0"]

    def _id_unguarded(self, i: int, image: Image.Image, refs: Sequence[Image.Image],
                      meta: dict[str, Any]) -> tuple[float, list]:
        if not refs:
            return 0.0, [f"sample {i}: no references, R_id = 0"]
        if self.face is not None:
            ref_faces, _, notes = reference_faces(refs, self.face, cache=self._ref_cache)
            res = match_faces(self.face.faces(image), ref_faces, self.face, notes)
            return res.face_sim, [f"sample {i}: {n}" for n in res.notes]
        # `masks`: the subjects' masks in the *generated* image (e.g. from annotate's Florence-2 + SAM 2 grounding).
        # Without them the score is each reference against the whole image: no one-to-one matching, and the note
        # says so.
        res = subject_similarity(image, refs, self.subject, masks=meta.get("masks"))  # type: ignore[arg-type]
        return res.score, [f"sample {i}: {n}" for n in res.notes]

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        n = len(batch.images)
        out: dict[str, list[float]] = {}
        notes = [f"R_{k} unavailable: {v}" for k, v in self.missing.items()]
        if self.text is not None:
            out["text"] = self.text.clip_t(batch.images, batch.prompts)
        if self.aes is not None:
            out["aes"] = self.aes.score(batch.images)
        if self.face is not None or self.subject is not None:
            metas = batch.metadata or [{} for _ in range(n)]
            ids = []
            for i in range(n):
                value, why = self._id(i, batch.images[i], batch.references[i], metas[i] or {})
                ids.append(value)
                notes.extend(why)
            out["id"] = ids
        return RewardOutput(components=out, notes=notes)


def _object_embedder(source: str, device: str) -> Embed:
    """DINO (ViT/DINOv2) or CLIP image embeddings, picked from the checkpoint's config."""
    from transformers import AutoConfig

    from ..metrics.loading import load_pretrained

    option = f"{CONFIG}.id_model"
    cfg = load_pretrained(AutoConfig, source, "subject embedding", option)
    if cfg.model_type == "clip":
        return ClipScorer.load(source, device=device, load_tokenizer=False, option=option).image_embeddings
    return DinoScorer.load(source, device=device, option=option).image_embeddings
