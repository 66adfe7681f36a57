"""What IPPO samples from and is scored by: the prompt pool (groups) and the reward function, made failure-proof.

Why a separate module: the training loop must never die mid-run because a reward model raised or an image had no
detectable subject. `score` turns every such case into defined zero rewards plus a note that is logged; only
configuration mistakes (unknown reward kind, missing weights for a weighted component) stop the run, and they do so
before the first step, with one line.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multicrafter.errors import UserError, one_line
from multicrafter.rewards.base import COMPONENTS, RewardBatch
from multicrafter.rewards.toyworld_reward import ToyReward
from multicrafter.rollout import GroupInput, Rollout

from .data import ToyWorldSource, ensure_toyworld, load_samples

# ----------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptsConfig:
    """Exactly one of `dataset` (a folder in the format of multicrafter/dataset_format.py) or `toyworld` (a set
    written on the fly under the output dir).
    Each sample gives one group: its caption, its reference crops and its metadata line (the ToyWorld scene)."""

    dataset: str | None = None
    toyworld: ToyWorldSource | None = None
    limit: int = 0                    # use only the first N samples (1: overfit on one prompt); 0 = all

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.toyworld is None):
            raise UserError("prompts: give exactly one of 'dataset' (a folder) or 'toyworld' (made on the fly)")
        if self.limit < 0:
            raise UserError(f"prompts.limit must be >= 0, got {self.limit}")


def load_prompts(cfg: PromptsConfig, output_dir: str | Path) -> list[GroupInput]:
    """The prompt pool, references loaded (small) and metadata kept for the reward."""
    root = Path(cfg.dataset) if cfg.dataset else ensure_toyworld(cfg.toyworld, output_dir)
    samples = load_samples(root)
    if cfg.limit:
        samples = samples[: cfg.limit]
    return [GroupInput(prompt=s.caption, references=[sub.load_reference() for sub in s.subjects],
                       metadata=dict(s.record)) for s in samples]


# ----------------------------------------------------------------------------------------------- rewards


@dataclass
class RewardConfig:
    """R = w_text R_text + w_aes R_aes + w_id R_id. `kind`: toy (ToyWorld evaluator), real (CLIP-T, LAION AES,
    Hungarian Face-Sim / object ID-Sim; `real` holds RealReward.load keyword arguments), or `module:callable`
    returning a RewardFn. `aggregation`: sum | per_component (see multicrafter.gspo)."""

    kind: str = "toy"
    weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "aes": 1.0, "id": 1.0})
    aggregation: str = "sum"
    real: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(COMPONENTS))
        if unknown:
            raise UserError(f"reward.weights: unknown component(s) {', '.join(unknown)} "
                            f"(known: {', '.join(COMPONENTS)})")
        if not any(w != 0 for w in self.weights.values()):
            raise UserError("reward.weights: all weights are 0, nothing to optimise")
        if self.aggregation not in ("sum", "per_component"):
            raise UserError(f"reward.aggregation must be sum or per_component, got {self.aggregation!r}")

    @property
    def active(self) -> dict[str, float]:
        return {k: float(w) for k, w in self.weights.items() if w != 0}


def build_reward(cfg: RewardConfig):
    """The reward function, checked before training: a weighted component the reward cannot compute is an error."""
    if cfg.kind == "toy":
        fn = ToyReward()
    elif cfg.kind == "real":
        # an optional heavy backend (CLIP, aesthetic head, face models): imported only when a run asks for it
        from multicrafter.rewards.real import RealReward

        try:
            fn = RealReward.load(**{"components": tuple(cfg.active), **cfg.real})
        except TypeError as exc:
            raise UserError(f"reward.real: {one_line(exc)}") from None
    elif ":" in cfg.kind:
        mod, _, attr = cfg.kind.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"reward.kind {cfg.kind!r} cannot be imported: {one_line(exc)}") from None
        fn = obj() if isinstance(obj, type) or not _is_reward_fn(obj) else obj
    else:
        raise UserError(f"reward.kind must be toy, real or module:callable, got {cfg.kind!r}")
    have = getattr(fn, "components", None)
    if have is not None:
        lacking = [k for k in cfg.active if k not in have]
        if lacking:
            why = "; ".join(getattr(fn, "missing", {}).get(k, "not provided") for k in lacking)
            raise UserError(f"reward component(s) {', '.join(lacking)} have a weight but are unavailable ({why}); "
                            "set their weight to 0 or supply the model")
    return fn


def _is_reward_fn(obj: Any) -> bool:
    """A factory is called with no arguments; a reward function takes the batch."""
    try:
        return len(inspect.signature(obj).parameters) >= 1
    except (TypeError, ValueError):
        return True


@dataclass
class Scores:
    components: dict[str, list[float]]   # every component in COMPONENTS, one value per image; weighted ones always
                                         # finite (failures are 0), unweighted ones NaN where not computed
    notes: list[str]
    failed: int                          # images whose reward call failed entirely (scored 0)


def score(reward_fn, ro: Rollout, weights: dict[str, float]) -> Scores:
    """Score a rollout's images group by group; failures become 0 with a note, never an exception."""
    comps: dict[str, list[float]] = {k: [] for k in COMPONENTS}
    notes: list[str] = []
    failed = 0
    for g, ctx in enumerate(ro.groups):
        imgs = ro.images[ro.group_slice(g)]
        n = len(imgs)
        batch = RewardBatch(images=list(imgs), prompts=[ctx.prompt] * n, references=[list(ctx.references)] * n,
                            metadata=[ctx.metadata] * n)
        try:
            out = reward_fn(batch)
            got, extra = dict(out.components), list(out.notes)
        except Exception as exc:  # noqa: BLE001 - a reward must never stop training
            got, extra = None, [f"group {g}: reward failed ({one_line(exc)}): scored 0"]
            failed += n
        notes.extend(extra)
        for k in COMPONENTS:
            required = weights.get(k, 0) != 0
            values = got.get(k) if got is not None else None
            if values is not None and len(values) != n:
                notes.append(f"group {g}: reward component '{k}' has {len(values)} values for {n} images: ignored")
                values = None
            if values is None:
                if required and got is not None:
                    notes.append(f"group {g}: reward component '{k}' not computed: scored 0")
                comps[k].extend([0.0 if required else math.nan] * n)
                continue
            for v in values:
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    v = math.nan
                if not math.isfinite(v) and required:
                    notes.append(f"group {g}: non-finite '{k}' reward scored 0")
                    v = 0.0
                comps[k].append(v)
    return Scores(components=comps, notes=notes, failed=failed)


__all__ = ["PromptsConfig", "RewardConfig", "Scores", "build_reward", "load_prompts", "score"]
