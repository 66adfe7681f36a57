"""The reward interface every reward (toy or real) implements, and the weighted composite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

COMPONENTS = ("text", "aes", "id")


@dataclass
class RewardBatch:
    images: list[Image.Image]
    prompts: list[str]
    references: list[list[Image.Image]]
    metadata: list[dict[str, Any]] | None = None   # e.g. the ToyWorld scene spec of each sample


@dataclass
class RewardOutput:
    components: dict[str, list[float]]              # keys from COMPONENTS, one value per image
    notes: list[str] = field(default_factory=list)  # why a component was 0 for some sample, etc.


class RewardFn(Protocol):
    def __call__(self, batch: RewardBatch) -> RewardOutput: ...


def composite(components: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """Weighted sum R = sum_k w_k R_k per sample; components missing from `weights` are ignored."""
    keys = [k for k in weights if weights[k] != 0]
    n = len(next(iter(components.values()))) if components else 0
    out = [0.0] * n
    for k in keys:
        if k not in components:
            raise KeyError(f"reward component '{k}' has a weight but was not computed")
        for i, v in enumerate(components[k]):
            out[i] += float(weights[k]) * float(v)
    return out
