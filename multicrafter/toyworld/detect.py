"""Reading ToyWorld images back without learned weights: background, subject regions and attribute descriptors.

Pipeline: the background tones come from the image border (a plain colour or a colour + a darker texture tone);
pixels far from both are foreground; connected components are subjects (a component much larger than expected is
split with 2-means on pixel positions: touching or occluding subjects). Each region gets a descriptor read from
its pixels: a palette colour histogram, a shape posterior (radial silhouette signature against prototype shapes,
with a small rotation search) and a pattern posterior (transition statistics of the two dominant colours against
pattern prototypes). Prototypes are rendered on first use, so they always match the renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .render import BACKGROUNDS, draw_sprite, texture_tone
from .subjects import COLOUR_ARRAY, COLOUR_NAMES, PATTERNS, SHAPES, Identity

FG_THRESHOLD = 45.0        # RGB distance from every background tone above which a pixel is foreground
TONE_MAX_GAP = 75.0        # a second border tone farther than this from the first is not a background texture
CONFIDENT_COLOUR = 70.0    # pixels farther than this from every palette colour count for no colour
PRESENCE = 0.2             # a colour covering this fraction of a region counts as fully present
N_BINS = 48                # radial signature bins (7.5 degrees)
MAX_SHIFT = 3              # rotation search: +-3 bins = +-22.5 degrees
SHAPE_TAU = 0.005          # shape posterior temperature (signature distance units)
SHAPE_NULL = 0.09          # distance of the "no known shape" class (clean renders stay below ~0.055)
PATTERN_TAU = 1.0          # pattern posterior temperature (squared standardised distance)
PATTERN_NULL = 40.0        # squared distance of the "no known pattern" class (clean renders stay below ~13)


@dataclass
class Region:
    """One found subject (or reference) region with its attribute descriptor."""
    mask: np.ndarray            # bool HxW
    area: int
    centroid: tuple[float, float]   # (x, y) in pixels
    box: list[int]              # [x0, y0, x1, y1)
    colour_hist: np.ndarray     # (n_colours,) fraction of region pixels per palette colour
    shape_post: np.ndarray      # (n_shapes,)
    pattern_post: np.ndarray    # (n_patterns,)

    @property
    def presence(self) -> np.ndarray:
        """Per palette colour, its presence in the region in [0, 1] (covering PRESENCE of the region or more: 1)."""
        return np.clip(self.colour_hist / PRESENCE, 0.0, 1.0)

    def predicted(self) -> dict:
        """Best-guess attributes: shape, unordered top-2 colours, pattern."""
        top = np.argsort(-self.colour_hist, kind="stable")[:2]
        return {"shape": SHAPES[int(np.argmax(self.shape_post))],
                "colours": sorted(COLOUR_NAMES[int(i)] for i in top),
                "pattern": PATTERNS[int(np.argmax(self.pattern_post))]}


# ----------------------------------------------------------------------------------------------- background


def estimate_background(img: np.ndarray) -> np.ndarray:
    """Background tones (1 or 2 rows of RGB floats) from the 2-pixel image border."""
    h, w = img.shape[:2]
    b = max(1, min(2, h // 8, w // 8))
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                             img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)]).astype(np.float32)
    tone1 = _mode_colour(border)
    tones = [tone1]
    for pixels, min_frac in ((border, 0.1), (img.reshape(-1, 3).astype(np.float32), 0.03)):
        d = np.linalg.norm(pixels - tone1, axis=1)
        near = pixels[(d > 25) & (d < TONE_MAX_GAP)]   # a texture tone is a subtle variant of the main tone
        if len(near) >= min_frac * len(pixels):
            tones.append(_mode_colour(near))
            break
    return np.stack(tones)


def _mode_colour(pixels: np.ndarray) -> np.ndarray:
    q = (pixels // 16).astype(np.int64)
    codes = q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]
    vals, counts = np.unique(codes, return_counts=True)
    top = vals[np.argmax(counts)]
    return np.median(pixels[codes == top], axis=0)


def _tone_d2(img: np.ndarray, tones: np.ndarray) -> np.ndarray:
    """Squared RGB distance of every pixel to every tone: (H, W, n_tones)."""
    return np.stack([((img.astype(np.float32) - t) ** 2).sum(-1) for t in tones], axis=-1)


def foreground_mask(img: np.ndarray, tones: np.ndarray) -> np.ndarray:
    """HxW bool: pixels farther than FG_THRESHOLD (RGB distance) from every background tone."""
    return _tone_d2(img, tones).min(-1) > FG_THRESHOLD**2


def classify_background(img: np.ndarray, tones: np.ndarray, fg: np.ndarray) -> dict:
    """Name the background colour and texture ({"colour", "texture"}) from its tones and the non-subject pixels."""
    names = list(BACKGROUNDS)
    base = np.array([BACKGROUNDS[n] for n in names], dtype=np.float32)
    dark = np.array([texture_tone(n) for n in names], dtype=np.float32)
    if len(tones) == 1:
        cost = np.linalg.norm(base - tones[0], axis=1)
    else:
        c1 = np.linalg.norm(base - tones[0], axis=1) + np.linalg.norm(dark - tones[1], axis=1)
        c2 = np.linalg.norm(base - tones[1], axis=1) + np.linalg.norm(dark - tones[0], axis=1)
        cost = np.minimum(c1, c2) / 2
    colour = names[int(np.argmin(cost))]
    texture = "plain"
    if len(tones) == 2:
        bgpix = ~fg
        which = np.argmin(_tone_d2(img, tones), -1)
        dark_idx = int(np.argmin(tones.sum(1)))
        lab = np.where(bgpix, (which == dark_idx).astype(np.int8), -1)
        th, tv, frac = _transitions(lab)
        minority = min(frac, 1 - frac)
        if minority < 0.04:
            texture = "plain"
        elif th + tv > 0 and abs(tv - th) / (tv + th) > 0.5:
            texture = "striped"
        elif minority < 0.3:
            texture = "dotted"
        else:
            texture = "checkered"
    return {"colour": colour, "texture": texture}


# ----------------------------------------------------------------------------------------------- regions


def _split_two(mask: np.ndarray) -> list[np.ndarray]:
    """Split one region into two by 2-means on pixel coordinates (deterministic farthest-point init)."""
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs, ys], 1).astype(np.float32)
    c0 = pts[np.argmax(np.linalg.norm(pts - pts.mean(0), axis=1))]
    c1 = pts[np.argmax(np.linalg.norm(pts - c0, axis=1))]
    cents = np.stack([c0, c1])
    for _ in range(20):
        assign = np.argmin(np.linalg.norm(pts[:, None] - cents[None], axis=-1), axis=1)
        new = np.stack([pts[assign == k].mean(0) if np.any(assign == k) else cents[k] for k in range(2)])
        if np.allclose(new, cents):
            break
        cents = new
    out = []
    for k in range(2):
        m = np.zeros_like(mask)
        m[ys[assign == k], xs[assign == k]] = True
        out.append(m)
    return out


def find_regions(img: np.ndarray, expected: int | None = None, expected_area: float | None = None,
                 min_area: int | None = None) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Subject masks (largest first), the background tones and the foreground mask.

    With `expected` subjects and fewer components found, the largest component is split in two while it is
    clearly bigger than one subject (1.5x `expected_area`, or 1.6x the median other component)."""
    h, w = img.shape[:2]
    tones = estimate_background(img)
    fg = foreground_mask(img, tones)
    min_area = min_area if min_area is not None else max(12, int(0.004 * h * w))
    lab, n = ndimage.label(fg)
    if n == 0:
        return [], tones, fg
    areas = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    masks = [lab == (i + 1) for i in np.argsort(-areas, kind="stable") if areas[i] >= min_area]
    while expected and 0 < len(masks) < expected:
        big = masks[0]
        area = int(big.sum())
        if expected_area:
            split = area >= 1.5 * expected_area
        elif len(masks) > 1:
            split = area >= 1.6 * float(np.median([m.sum() for m in masks[1:]]))
        else:
            x0, y0, x1, y1 = _box(big)
            split = max(x1 - x0, y1 - y0) >= 1.5 * min(x1 - x0, y1 - y0)
        if not split or area < 2 * min_area:
            break
        masks = sorted(masks[1:] + _split_two(big), key=lambda m: -int(m.sum()))
    return masks, tones, fg


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ----------------------------------------------------------------------------------------------- descriptors


def radial_signature(mask: np.ndarray) -> np.ndarray:
    """Outer radius per angle bin from the centroid, normalised by its 90th percentile (robust to occlusion)."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    dx, dy = xs - cx, ys - cy
    r = np.hypot(dx, dy) + 0.5
    bins = ((np.arctan2(dy, dx) + math.pi) / (2 * math.pi) * N_BINS).astype(np.int64) % N_BINS
    sig = np.zeros(N_BINS)
    np.maximum.at(sig, bins, r)
    if np.any(sig == 0):  # tiny regions: fill empty bins from their neighbours
        idx = np.nonzero(sig)[0]
        if len(idx) == 0:
            return np.ones(N_BINS)
        sig = np.interp(np.arange(N_BINS), idx, sig[idx], period=N_BINS)
    return sig / max(np.percentile(sig, 90), 1e-6)


def signature_distances(sig: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """Distance to each prototype: trimmed mean |difference| (worst 20% of bins ignored: occlusion) at the best
    rotation within +-MAX_SHIFT bins."""
    shifts = np.stack([np.roll(sig, s) for s in range(-MAX_SHIFT, MAX_SHIFT + 1)])    # (S, B)
    diff = np.sort(np.abs(shifts[None] - protos[:, None]), axis=-1)[..., : int(0.8 * N_BINS)]
    return diff.mean(-1).min(-1)


@lru_cache(maxsize=1)
def _shape_prototypes() -> np.ndarray:
    protos = []
    for shape in SHAPES:
        canvas = np.zeros((100, 100, 3), np.uint8)
        labels = np.full((100, 100), -1, np.int16)
        draw_sprite(canvas, labels, 0, Identity(shape, "red", "blue", "split"), (50.0, 50.0), 40.0, 0.0)
        protos.append(radial_signature(labels == 0))
    return np.stack(protos)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def shape_posterior(mask: np.ndarray) -> np.ndarray:
    """Posterior over SHAPES; the mass of an outline farther than SHAPE_NULL from every prototype goes to no shape."""
    sig = radial_signature(mask)
    d = signature_distances(sig, _shape_prototypes())
    return _softmax(-np.append(d, SHAPE_NULL) / SHAPE_TAU)[:-1]


def _transitions(lab: np.ndarray) -> tuple[float, float, float]:
    """Horizontal / vertical transition rates between labelled (>= 0) neighbours, and the fraction labelled 1."""
    a, b = lab[:, :-1], lab[:, 1:]
    ok = (a >= 0) & (b >= 0)
    th = float(np.mean(a[ok] != b[ok])) if ok.any() else 0.0
    a, b = lab[:-1], lab[1:]
    ok = (a >= 0) & (b >= 0)
    tv = float(np.mean(a[ok] != b[ok])) if ok.any() else 0.0
    valid = lab >= 0
    frac = float(np.mean(lab[valid] == 1)) if valid.any() else 0.0
    return th, tv, frac


def pattern_features(img: np.ndarray, mask: np.ndarray, top2: tuple[int, int]) -> np.ndarray:
    """[anisotropy, transition density, centre/outside contrast, left/right contrast, minority fraction] of the
    region's map of its two dominant colours (each pixel labelled by the nearer one, so blur moves boundaries by
    a fraction of a pixel instead of punching holes in the map)."""
    x0, y0, x1, y1 = _box(mask)
    m = mask[y0:y1, x0:x1]
    crop = img[y0:y1, x0:x1].astype(np.float32)
    d1 = ((crop - COLOUR_ARRAY[top2[0]]) ** 2).sum(-1)
    d0 = ((crop - COLOUR_ARRAY[top2[1]]) ** 2).sum(-1)
    near = np.minimum(d1, d0) <= (2 * CONFIDENT_COLOUR) ** 2
    lab = np.where(m & near, (d1 < d0).astype(np.int8), -1).astype(np.int8)
    th, tv, _ = _transitions(lab)
    radius = math.sqrt(m.sum() / math.pi)
    ys, xs = np.nonzero(lab >= 0)
    if len(xs) < 4:
        return np.zeros(5)
    vals = lab[ys, xs] == 1
    cx, cy = xs.mean(), ys.mean()
    dist = np.hypot(xs - cx, ys - cy)
    inner = dist < 0.5 * np.percentile(dist, 95)
    radial = abs(vals[inner].mean() - vals[~inner].mean()) if inner.any() and (~inner).any() else 0.0
    left = xs < cx
    lr = abs(vals[left].mean() - vals[~left].mean()) if left.any() and (~left).any() else 0.0
    frac = vals.mean()
    aniso = (tv - th) / (tv + th) if tv + th > 0 else 0.0
    return np.array([aniso, (th + tv) * radius / 4.0, radial, lr, min(frac, 1 - frac)])


@lru_cache(maxsize=1)
def _pattern_prototypes() -> tuple[np.ndarray, np.ndarray]:
    """Per-pattern feature mean and spread from renders over all shapes, a few sizes and rotations."""
    rng = np.random.default_rng(1234)
    feats = {p: [] for p in PATTERNS}
    for pattern in PATTERNS:
        for shape in SHAPES:
            for radius in (14.0, 22.0, 34.0):
                rot = float(rng.uniform(-15, 15))
                size = int(2 * radius + 8)
                canvas = np.zeros((size, size, 3), np.uint8)
                labels = np.full((size, size), -1, np.int16)
                ident = Identity(shape, "red", "blue", pattern)
                draw_sprite(canvas, labels, 0, ident, (size / 2, size / 2), radius, rot)
                feats[pattern].append(pattern_features(canvas, labels == 0, (0, 5)))
    mu = np.stack([np.mean(feats[p], 0) for p in PATTERNS])
    sd = np.stack([np.maximum(np.std(feats[p], 0), 0.06) for p in PATTERNS])
    return mu, sd


def pattern_posterior(features: np.ndarray) -> np.ndarray:
    """Posterior over PATTERNS; mass beyond PATTERN_NULL (squared standardised distance) goes to no pattern."""
    mu, sd = _pattern_prototypes()
    d2 = np.sum(((features[None] - mu) / sd) ** 2, axis=1)
    return _softmax(-np.append(d2, PATTERN_NULL) / (2 * PATTERN_TAU))[:-1]


def palette_index(img: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Nearest palette colour per pixel, -1 when none is within CONFIDENT_COLOUR (or outside `where`)."""
    out = np.full(img.shape[:2], -1, dtype=np.int64)
    pix = img[where] if where is not None else img.reshape(-1, 3)
    pix = pix.astype(np.float32)
    d2 = (pix * pix).sum(1)[:, None] - 2 * pix @ COLOUR_ARRAY.T + (COLOUR_ARRAY * COLOUR_ARRAY).sum(1)[None]
    idx = np.argmin(d2, axis=1)
    idx = np.where(d2[np.arange(len(idx)), idx] <= CONFIDENT_COLOUR**2, idx, -1)
    if where is not None:
        out[where] = idx
    else:
        out = idx.reshape(img.shape[:2])
    return out


def describe_region(img: np.ndarray, mask: np.ndarray, colour_idx: np.ndarray | None = None) -> Region:
    """Attribute descriptor of one region of a float32 HxWx3 image."""
    if colour_idx is None:
        colour_idx = palette_index(img, mask)
    area = int(mask.sum())
    ci = colour_idx[mask]
    hist = np.bincount(ci[ci >= 0], minlength=len(COLOUR_ARRAY)).astype(np.float64) / max(area, 1)
    order = np.argsort(-hist, kind="stable")
    top2 = (int(order[0]), int(order[1]))
    ys, xs = np.nonzero(mask)
    return Region(mask=mask, area=area, centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), box=_box(mask),
                  colour_hist=hist, shape_post=shape_posterior(mask),
                  pattern_post=pattern_posterior(pattern_features(img, mask, top2)))


def describe_image(img: np.ndarray, expected: int | None = None,
                   expected_area: float | None = None) -> tuple[list[Region], np.ndarray, np.ndarray]:
    """All subject regions of an image with descriptors, plus the background tones and foreground mask."""
    img = img.astype(np.float32)
    masks, tones, fg = find_regions(img, expected, expected_area)
    colour_idx = palette_index(img, fg) if masks else None
    return [describe_region(img, m, colour_idx) for m in masks], tones, fg


def describe_reference(img: np.ndarray) -> Region | None:
    """The main subject of a reference image (its largest region), or None when there is none."""
    regions, _, _ = describe_image(img)
    return regions[0] if regions else None

