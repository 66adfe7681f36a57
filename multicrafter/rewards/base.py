"""The reward interface every reward (toy or real) implements, and the weighted composite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from ..errors import UserError

COMPONENTS = ("text", "aes", "id")


@dataclass
class RewardBatch:
    """What a reward scores: one generated image per sample, with its prompt, references and optional metadata."""

    images: list[Image.Image]
    prompts: list[str]
    references: list[list[Image.Image]]
    metadata: list[dict[str, Any]] | None = None   # e.g. the ToyWorld scene spec of each sample


@dataclass
class RewardOutput:
    """One list of per-image values per reward component, plus notes on components that fell back to 0."""

    components: dict[str, list[float]]              # keys from COMPONENTS, one value per image
    notes: list[str] = field(default_factory=list)  # why a component was 0 for some sample, etc.


class RewardFn(Protocol):
    """Any callable scoring a RewardBatch (ToyReward, RealReward)."""

    def __call__(self, batch: RewardBatch) -> RewardOutput: ...


class MissingRewardComponent(UserError, KeyError):
    """A weighted component was not computed: never replaced by a made-up number (a KeyError for dict-like callers)."""

    __str__ = Exception.__str__


def composite(components: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """Weighted sum R = sum_k w_k R_k per sample (the one definition; IPPO's advantages start from it).
    Components with weight 0 are ignored; a weighted component that is missing is refused."""
    active = {k: float(w) for k, w in weights.items() if float(w) != 0}
    missing = [k for k in active if k not in components]
    if missing:
        raise MissingRewardComponent(f"reward component(s) {', '.join(missing)} have a weight but were not computed")
    n = len(next(iter(components.values()))) if components else 0
    out = [0.0] * n
    for k, w in active.items():
        for i, v in enumerate(components[k]):
            out[i] += w * float(v)
    return out
