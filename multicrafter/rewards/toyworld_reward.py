"""IPPO rewards on the toy path, from the deterministic ToyWorld evaluator (no learned weights).

R_text = layout/text accuracy (subjects at their stated positions, background colour and texture), R_aes = image
quality (palette fidelity), R_id = Hungarian identity similarity (each subject matched at most once, missing
subjects 0). The truth for R_text comes from `RewardBatch.metadata[i]` (a scene spec, or a dataset metadata line whose
"toyworld" key holds one); without it the prompt is parsed. Failures give 0 with a note, never an exception.
"""

from __future__ import annotations

from typing import Any

from ..toyworld.evaluate import evaluate_image
from .base import RewardBatch, RewardOutput

COMPONENT_METRICS = {"text": "layout", "aes": "quality", "id": "id_sim"}


def _scene_of(meta: Any) -> dict | None:
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("toyworld"), dict):
        return meta["toyworld"]
    return meta if "subjects" in meta and "background" in meta else None


class ToyReward:
    """RewardFn over ToyWorld: components text (layout), aes (quality), id (Hungarian identity)."""

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        n = len(batch.images)
        metadata = batch.metadata if batch.metadata is not None else [None] * n
        components: dict[str, list[float]] = {k: [] for k in COMPONENT_METRICS}
        notes: list[str] = []
        for i in range(n):
            prompt = batch.prompts[i] if i < len(batch.prompts) else None
            refs = batch.references[i] if i < len(batch.references) else []
            meta = metadata[i] if i < len(metadata) else None
            try:
                result = evaluate_image(batch.images[i], refs, scene=_scene_of(meta), prompt=prompt)
            except Exception as exc:  # noqa: BLE001 - a reward must never stop training
                result = {m: 0.0 for m in COMPONENT_METRICS.values()}
                result["notes"] = [f"evaluation failed: {type(exc).__name__}: {exc}"]
            for comp, metric in COMPONENT_METRICS.items():
                components[comp].append(float(result[metric]))
            notes.extend(f"sample {i}: {note}" for note in result.get("notes", []))
        return RewardOutput(components=components, notes=notes)


def toy_reward() -> ToyReward:
    """Factory used by training configs (`reward: toy`)."""
    return ToyReward()
