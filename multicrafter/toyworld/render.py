"""Pure-numpy rendering of ToyWorld sprites, scenes, masks and references.

Every sprite is drawn from an implicit function in its own rotated, scaled frame (u, v in [-1, 1]), with hard edges:
masks are exact (the label map records which subject owns each pixel; later subjects occlude earlier ones) and the
pixels carry only palette colours, which is what lets the evaluator read attributes back without learned weights.
Only the sprite's bounding box is evaluated, so a 128 px scene takes well under a millisecond per subject.
"""

from __future__ import annotations

import math

import numpy as np

from .subjects import COLOURS, Identity

# Background colours (pale, far from every subject colour) and textures; the second tone is the base darkened.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "grey": (150, 150, 150),
    "beige": (225, 205, 170),
    "pale blue": (185, 210, 240),
    "pale green": (195, 230, 190),
    "lavender": (215, 200, 235),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
TEXTURE_TONE = 0.86            # second background tone = base * TEXTURE_TONE
REFERENCE_BACKGROUND = "white"
_STAR_INNER = 0.45


def texture_tone(colour: str) -> tuple[int, int, int]:
    """The second tone of a textured background: the base colour darkened by TEXTURE_TONE."""
    return tuple(int(round(c * TEXTURE_TONE)) for c in BACKGROUNDS[colour])


def _rgb(name: str) -> np.ndarray:
    return np.array(COLOURS[name], dtype=np.uint8)


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the unit-sized shape in local coordinates (v points down). Every shape fits radius ~1."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 0.88**2
    if shape == "square":
        return np.maximum(au, av) <= 0.72
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "hexagon":
        return (av <= 0.866) & (0.5 * av + 0.866 * au <= 0.866)
    if shape == "triangle":  # apex up, circumradius 1, centred on its circumcentre
        y = v - 0.15  # shift down a little so the silhouette is centred in its box
        return (y <= 0.5) & (1.732 * u - y <= 1.0) & (-1.732 * u - y <= 1.0)
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.9)) | ((av <= 0.3) & (au <= 0.9))
    if shape == "star":  # 5 points, first tip straight up; fold into one 36-degree half-sector
        r = np.hypot(u, v)
        theta = np.mod(np.arctan2(u, -v), 2 * math.pi / 5)
        theta = np.minimum(theta, 2 * math.pi / 5 - theta)
        x, y = r * np.cos(theta), r * np.sin(theta)
        x2, y2 = _STAR_INNER * math.cos(math.pi / 5), _STAR_INNER * math.sin(math.pi / 5)
        return (x2 - 1.0) * y - y2 * (x - 1.0) >= 0
    if shape == "heart":
        x = 1.12 * u
        y = -1.12 * v + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def pattern_accent(pattern: str, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the accent colour goes (intersected with the shape by the caller)."""
    if pattern == "striped":  # horizontal bands 0.5 wide
        return np.floor((v + 1.0) / 0.5).astype(np.int64) % 2 == 1
    if pattern == "dotted":   # dots of radius 0.2 on a 0.6 grid through the centre
        du = u - 0.6 * np.round(u / 0.6)
        dv = v - 0.6 * np.round(v / 0.6)
        return du * du + dv * dv <= 0.2**2
    if pattern == "checkered":
        return (np.floor(u / 0.5).astype(np.int64) + np.floor(v / 0.5).astype(np.int64)) % 2 == 0
    if pattern == "ringed":   # a smaller copy of the shape inside: body forms a ring around an accent core
        return shape_inside(shape, u / 0.55, v / 0.55)
    if pattern == "split":    # right half in the accent colour
        return u > 0
    raise ValueError(f"unknown pattern {pattern!r}")


def draw_sprite(canvas: np.ndarray, labels: np.ndarray | None, label: int, identity: Identity,
                center: tuple[float, float], radius: float, rotation: float = 0.0) -> None:
    """Paint one sprite into `canvas` (H, W, 3 uint8) in place, recording `label` in `labels` where it is visible."""
    h, w = canvas.shape[:2]
    cx, cy = center
    ext = radius * 1.05 + 1
    x0, x1 = max(0, int(math.floor(cx - ext))), min(w, int(math.ceil(cx + ext)) + 1)
    y0, y1 = max(0, int(math.floor(cy - ext))), min(h, int(math.ceil(cy + ext)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    u = (c * xs + s * ys) / radius       # rotate the pixel grid by -rotation into the sprite frame
    v = (-s * xs + c * ys) / radius
    inside = shape_inside(identity.shape, u, v)
    accent = inside & pattern_accent(identity.pattern, identity.shape, u, v)
    region = canvas[y0:y1, x0:x1]
    region[inside] = _rgb(identity.body)
    region[accent] = _rgb(identity.accent)
    if labels is not None:
        labels[y0:y1, x0:x1][inside] = label


def render_background(width: int, height: int, colour: str, texture: str) -> np.ndarray:
    """Background image: a base colour and, for textures, a darker second tone at a period of 1/8 of the size."""
    if colour not in BACKGROUNDS:
        raise ValueError(f"unknown background colour {colour!r}")
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[colour]
    if texture == "plain":
        return img
    period = max(4, min(width, height) // 8)
    ys, xs = np.mgrid[0:height, 0:width]
    if texture == "striped":      # vertical bands (subjects' stripes are horizontal)
        mask = (xs // (period // 2)) % 2 == 1
    elif texture == "dotted":
        cy = (ys + period // 2) % period - period / 2 + 0.5   # dots centred on the image edges too
        cx = (xs + period // 2) % period - period / 2 + 0.5
        mask = cx * cx + cy * cy <= (period * 0.22) ** 2
    elif texture == "checkered":
        mask = ((xs // period) + (ys // period)) % 2 == 1
    else:
        raise ValueError(f"unknown background texture {texture!r}")
    img[mask] = texture_tone(colour)
    return img


def render_scene(scene: dict) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene spec -> (image uint8 HxWx3, labels int16 HxW with -1 = background, k = subject k)."""
    width, height = scene["size"]
    bg = scene["background"]
    img = render_background(width, height, bg["colour"], bg["texture"])
    labels = np.full((height, width), -1, dtype=np.int16)
    for k, subj in enumerate(scene["subjects"]):
        draw_sprite(img, labels, k, Identity.from_dict(subj), tuple(subj["center"]), subj["radius"], subj["rotation"])
    return img, labels


def render_reference(subject: dict | Identity, size: int = 64, view: dict | None = None) -> np.ndarray:
    """A subject alone on the plain reference background. `view` = {"center": [x, y] as fractions of the size,
    "radius": fraction of the size, "rotation": degrees}; None gives the canonical centred, upright view."""
    ident = subject if isinstance(subject, Identity) else Identity.from_dict(subject)
    view = view or {"center": [0.5, 0.5], "radius": 0.38, "rotation": 0.0}
    img = render_background(size, size, REFERENCE_BACKGROUND, "plain")
    center = (view["center"][0] * size, view["center"][1] * size)
    draw_sprite(img, None, 0, ident, center, view["radius"] * size, view["rotation"])
    return img


def masks_from_labels(labels: np.ndarray, n: int) -> list[np.ndarray]:
    """Per-subject boolean masks (exactly the pixels where subject k is visible)."""
    return [labels == k for k in range(n)]


def box_of(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] (x1/y1 exclusive) of a boolean mask; [0, 0, 0, 0] when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
