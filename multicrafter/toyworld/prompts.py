"""The ToyWorld prompt vocabulary: scene spec -> prompt, and prompt -> the attributes and layout it states.

Parsing is the exact inverse of `make_prompt`, so the text/layout reward can be computed from a prompt alone.
"""

from __future__ import annotations

import re

from .render import BACKGROUNDS, TEXTURES
from .subjects import COLOURS, PATTERNS, SHAPES

POSITION_PHRASES = {
    "centre": "in the centre",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
}
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# How much of each subject a prompt states. `full` is the training caption; the others are probes of what the model
# reads from the references rather than the text: `no-shape` drops the shape word, `positions` names only where each
# subject is ("an object on the left"), so every attribute must come from its reference image.
PROMPT_STYLES = ("full", "no-shape", "positions")


def subject_phrase(subject: dict, style: str = "full") -> str:
    """'a red-blue striped star' (full), 'a red-blue striped' (no-shape) or 'an object' (positions)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "positions":
        return "an object"
    body, accent = subject["colours"]
    return f"{_article(body)} {body}-{accent} {subject['pattern']}" + (f" {subject['shape']}" if style == "full" else "")


def background_phrase(background: dict) -> str:
    """The prompt's background phrase, e.g. 'on a plain white background'."""
    colour, texture = background["colour"], background["texture"]
    if texture == "plain":
        return f"on a plain {colour} background"
    return f"on {_article(colour)} {colour} {texture} background"


def make_prompt(scene: dict, style: str = "full") -> str:
    """'a red-blue striped star on the left and a ... on the right, on a beige dotted background' (see PROMPT_STYLES)."""
    return f"{_subjects_clause(scene['subjects'], style)}, {background_phrase(scene['background'])}"


def _subjects_clause(subjects: list[dict], style: str) -> str:
    return _join([f"{subject_phrase(s, style)} {POSITION_PHRASES[s['position']]}" for s in subjects])


_ALT = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
_SUBJECT_RE = re.compile(
    rf"\ban? (?P<body>{_ALT(COLOURS)})-(?P<accent>{_ALT(COLOURS)}) (?P<pattern>{_ALT(PATTERNS)}) "
    rf"(?P<shape>{_ALT(SHAPES)}) (?P<where>{_ALT(_PHRASE_TO_POSITION)})\b"
)
_BG_RE = re.compile(
    rf"\bon an? (?:(?P<plain>plain) )?(?P<colour>{_ALT(BACKGROUNDS)})(?: (?P<texture>{_ALT(TEXTURES)}))? background\b"
)


def parse_prompt(prompt: str) -> dict:
    """Recover {"subjects": [{shape, colours, pattern, position}], "background": {colour, texture}} from a prompt.

    Raises ValueError when the prompt does not use the ToyWorld vocabulary.
    """
    text = " ".join(prompt.lower().split())
    subjects = [
        {"shape": m["shape"], "colours": [m["body"], m["accent"]], "pattern": m["pattern"],
         "position": _PHRASE_TO_POSITION[m["where"]]}
        for m in _SUBJECT_RE.finditer(text)
    ]
    if not subjects:
        raise ValueError(f"prompt names no ToyWorld subject: {prompt[:80]!r}")
    bg = _BG_RE.search(text)
    background = None
    if bg:
        background = {"colour": bg["colour"], "texture": "plain" if bg["plain"] else (bg["texture"] or "plain")}
    return {"subjects": subjects, "background": background}


def restyle_prompt(prompt: str, style: str) -> str:
    """A ToyWorld prompt restated in another PROMPT_STYLE (training on `positions` captions makes identity come from
    the references). Raises ValueError for a prompt outside the ToyWorld vocabulary."""
    scene = parse_prompt(prompt)
    bg = scene["background"]
    return _subjects_clause(scene["subjects"], style) + (f", {background_phrase(bg)}" if bg else "")
