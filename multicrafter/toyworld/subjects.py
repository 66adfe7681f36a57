"""ToyWorld identities: a subject is a combination of attributes (shape, colour pair, pattern).

Why attributes: leakage becomes countable. When subject A comes out with B's accent colour or B's stripes, the
evaluator can name which attribute crossed over. The catalogue is every (shape, pattern, unordered colour pair), so
similar pairs (same shape and pattern with other colours; same shape and colours with another pattern) exist for
every identity, the analogue of "two people of the same gender". The held-out split is by identity (a stable hash),
so test identities are unseen combinations of seen attributes.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "heart")
PATTERNS = ("striped", "dotted", "checkered", "ringed", "split")
# Vivid subject colours, pairwise >= ~80 apart in RGB and far from every background tone below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 130, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "teal": (0, 160, 170),
    "blue": (40, 80, 220),
    "purple": (130, 50, 190),
    "pink": (240, 110, 190),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_ARRAY = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)

TEST_FRACTION_MOD = 5  # identities whose hash is 0 mod 5 are held out (~20%)
SIMILAR_KINDS = ("colour", "pattern")


@dataclass(frozen=True)
class Identity:
    """One ToyWorld subject: a shape in a body colour with a pattern in an accent colour."""

    shape: str
    body: str      # main colour
    accent: str    # pattern colour
    pattern: str

    @property
    def id(self) -> str:
        """Stable identifier 'shape-body-accent-pattern'."""
        return f"{self.shape}-{self.body}-{self.accent}-{self.pattern}"

    @property
    def name(self) -> str:
        """The phrase used in prompts and as the dataset subject name."""
        return f"{self.body}-{self.accent} {self.pattern} {self.shape}"

    @property
    def colours(self) -> tuple[str, str]:
        """(body, accent) colour names."""
        return (self.body, self.accent)

    def to_dict(self) -> dict:
        """The form stored in scene specs (and metadata lines)."""
        return {"id": self.id, "shape": self.shape, "colours": [self.body, self.accent], "pattern": self.pattern}

    @staticmethod
    def from_dict(d: dict) -> Identity:
        """Inverse of `to_dict`."""
        body, accent = d["colours"]
        return Identity(shape=d["shape"], body=body, accent=accent, pattern=d["pattern"])


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(identity: Identity) -> str:
    """'test' for the fixed held-out ~20% of identities, else 'train' (order of the colour pair does not matter)."""
    key = f"{identity.shape}|{identity.pattern}|{'+'.join(sorted(identity.colours))}"
    return "test" if _hash_int(key) % TEST_FRACTION_MOD == 0 else "train"


@lru_cache(maxsize=1)
def catalogue() -> tuple[Identity, ...]:
    """All identities: 8 shapes x 5 patterns x 28 unordered colour pairs = 1120; body/accent order fixed by hash."""
    out = []
    for shape, pattern in itertools.product(SHAPES, PATTERNS):
        for a, b in itertools.combinations(COLOUR_NAMES, 2):
            flip = _hash_int(f"order|{shape}|{pattern}|{a}|{b}") % 2 == 1
            body, accent = (b, a) if flip else (a, b)
            out.append(Identity(shape=shape, body=body, accent=accent, pattern=pattern))
    return tuple(out)


@lru_cache(maxsize=4)
def identities(split: str = "train") -> tuple[Identity, ...]:
    """Identities of one split ('train', 'test' or 'all'), in catalogue order."""
    if split == "all":
        return catalogue()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return tuple(i for i in catalogue() if split_of(i) == split)


def by_id(identity_id: str) -> Identity:
    """The identity with this id; ValueError for a malformed or unknown id."""
    try:
        shape, body, accent, pattern = identity_id.split("-")
    except ValueError:
        raise ValueError(f"not a ToyWorld identity id: {identity_id!r}") from None
    ident = Identity(shape, body, accent, pattern)
    if shape not in SHAPES or pattern not in PATTERNS or body not in COLOURS or accent not in COLOURS or body == accent:
        raise ValueError(f"not a ToyWorld identity id: {identity_id!r}")
    return ident


def is_similar(a: Identity, b: Identity, kind: str) -> bool:
    """'colour': same shape and pattern, different colour pair; 'pattern': same shape and colours, other pattern."""
    same_colours = set(a.colours) == set(b.colours)
    if kind == "colour":
        return a.shape == b.shape and a.pattern == b.pattern and not same_colours
    if kind == "pattern":
        return a.shape == b.shape and same_colours and a.pattern != b.pattern
    raise ValueError(f"similar kind must be one of {SIMILAR_KINDS}, got {kind!r}")


@lru_cache(maxsize=8)
def similar_pairs(split: str = "train", kind: str = "colour") -> tuple[tuple[Identity, Identity], ...]:
    """All unordered similar pairs of `kind` with both identities in `split`."""
    pool = identities(split)
    groups: dict[tuple, list[Identity]] = {}
    for ident in pool:
        key = (ident.shape, ident.pattern) if kind == "colour" else (ident.shape, frozenset(ident.colours))
        groups.setdefault(key, []).append(ident)
    pairs = []
    for members in groups.values():
        for a, b in itertools.combinations(members, 2):
            if is_similar(a, b, kind):
                pairs.append((a, b))
    return tuple(pairs)
