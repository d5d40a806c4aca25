"""Images the evaluator must answer "no object" or "unknown shape" for, with what it should read in them.

A detector trained on toy world scenes alone reads anything as a scene: uniform noise as a held-out subject,
an empty background as a one-object layout, a random polygon as a star, all with confidence near 0.9. So the
evaluator is also trained on these negatives, and `bench`/tests measure its false positives on fresh ones:

- "noise": per-pixel or smooth (low-frequency) colour noise; no object, background "other".
- "flat": one colour far from every plain background; no object, background "other".
- "empty": a real background and nothing on it.
- "polygon": a random 5-9 sided polygon with uneven radii at a scene position; shape "unknown".
- "blob": a smooth random outline (a circle with strong 2nd-4th harmonics); shape "unknown".
- "broken": a known shape with a band cut through its middle (two pieces); shape "unknown".

The object kinds (polygon, blob, broken) take a real scene's layout, colours, textures and placement jitter;
in a two-object layout the other object is, half the time, a real one (read as itself). Sizes of unknown
objects are not asked (their outlines have no size class).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toyworld import scenes

NO_OBJECT = "none"  # the layout read when nothing is there
UNKNOWN_SHAPE = "unknown"
OTHER_BACKGROUND = "other"
OBJECT_KINDS = ("polygon", "blob", "broken")
KINDS = ("noise", "flat", "empty", *OBJECT_KINDS)
MIN_FLAT_DISTANCE = 70.0  # RGB distance of a "flat" field from every background colour


@dataclass(frozen=True)
class ObjectTruth:
    """One object of a negative image: a known shape (all attributes) or "unknown" (size not asked)."""

    position: str
    shape: str
    colour: str
    texture: str
    size: str | None


@dataclass(frozen=True)
class Truth:
    """What the evaluator should read in a negative image."""

    kind: str
    background: str  # a scenes.BACKGROUNDS name or "other"
    objects: tuple[ObjectTruth, ...]

    @property
    def layout(self) -> str:
        """The layout label: the positions joined by "+" in scenes.LAYOUTS order, or "none"."""
        if not self.objects:
            return NO_OBJECT
        wanted = sorted(o.position for o in self.objects)
        return next("+".join(lay) for lay in scenes.LAYOUTS if sorted(lay) == wanted)


def _random_polygon(rng: np.random.Generator):
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.35, 1.0, n)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return lambda u, v: scenes.polygon(u, v, pts)


def _random_blob(rng: np.random.Generator):
    ks = np.arange(2, 5)
    amps = rng.uniform(0.05, 0.22, ks.size)
    amps[rng.integers(ks.size)] = rng.uniform(0.3, 0.45)  # at least one strong harmonic: never a circle
    phases = rng.uniform(0, 2 * np.pi, ks.size)
    base = rng.uniform(0.7, 0.85)

    def mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        theta = np.arctan2(v, u)[..., None]
        r = base * (1 + (amps * np.cos(ks * theta + phases)).sum(-1))
        return u * u + v * v <= r * r

    return mask


def _broken(rng: np.random.Generator):
    whole = scenes.SHAPE_MASKS[str(rng.choice(scenes.SHAPES))]
    phi = rng.uniform(0, np.pi)
    offset, width = rng.uniform(-0.12, 0.12), rng.uniform(0.35, 0.55)
    c, s = np.cos(phi), np.sin(phi)
    return lambda u, v: whole(u, v) & (np.abs(u * c + v * s - offset) >= width / 2)


OUTLINES = {"polygon": _random_polygon, "blob": _random_blob, "broken": _broken}
MAX_IOU = 0.7  # an outline this close to a known shape (any rotation, either size) is drawn anew
_GRID = np.linspace(-1.3, 1.3, 48, dtype=np.float32)
_U, _V = np.meshgrid(_GRID, _GRID)


@functools.cache
def _known() -> np.ndarray:
    """Every known shape's mask at each rotation and size: (shapes x rotations x scales, 48 * 48) bool."""
    masks = []
    for mask in scenes.SHAPE_MASKS.values():
        for angle in np.linspace(-np.pi / 4, np.pi / 4, 9):
            c, s = np.cos(angle), np.sin(angle)
            u, v = c * _U + s * _V, c * _V - s * _U
            for scale in (scenes.RADII["small"] / scenes.RADII["large"], 0.85, 1.0, 1.2):
                masks.append(mask(u / scale, v / scale).ravel())
    return np.stack(masks)


def is_distinct(mask) -> bool:
    """Whether an outline differs from every known shape (IoU <= MAX_IOU at every rotation and size)."""
    m = mask(_U, _V).ravel()
    known = _known()
    inter = (known & m).sum(1)
    union = (known | m).sum(1)
    return bool(m.any() and (inter / np.maximum(union, 1)).max() <= MAX_IOU)


def outline(kind: str, rng: np.random.Generator):
    """A random mask of an object kind that is none of the known shapes (a broken shape is one by its gap)."""
    while True:
        mask = OUTLINES[kind](rng)
        if kind == "broken" or is_distinct(mask):
            return mask


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    if rng.random() < 0.5:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    cells = int(rng.choice([2, 4, 8, 16]))
    grid = rng.uniform(0, 255, (cells, cells, 3))
    idx = np.minimum((np.arange(size) * cells) // size, cells - 1)
    return grid[idx][:, idx].astype(np.uint8)


def _flat(rng: np.random.Generator, size: int) -> np.ndarray:
    plain = np.array([c for cols in scenes.BACKGROUND_RGB.values() for c in cols], dtype=np.float64)
    while True:
        rgb = rng.uniform(0, 255, 3)
        if np.linalg.norm(plain - rgb, axis=1).min() >= MIN_FLAT_DISTANCE:
            return np.broadcast_to(rgb.astype(np.uint8), (size, size, 3)).copy()


def negative(kind: str, seed: int, size: int = 64) -> tuple[np.ndarray, Truth]:
    """One negative image of `kind` ((size, size, 3) uint8) and its truth; same arguments => same pixels."""
    if kind not in KINDS:
        raise ValueError(f"unknown negative kind {kind!r}; choose {', '.join(KINDS)}")
    rng = np.random.default_rng((seed, 0x9E6))
    if kind == "noise":
        return _noise(rng, size), Truth(kind, OTHER_BACKGROUND, ())
    if kind == "flat":
        return _flat(rng, size), Truth(kind, OTHER_BACKGROUND, ())
    scene = scenes.sample_scene(seed, "all")
    if kind == "empty":
        return scenes.Canvas.of(scene.background, size).finish(), Truth(kind, scene.background, ())
    canvas = scenes.Canvas.of(scene.background, size)
    truths = []
    unknown_first = rng.random() < 0.5
    for i, (o, p) in enumerate(zip(scene.objects, scenes.placements(scene, seed), strict=True)):
        real = len(scene.objects) == 2 and rng.random() < 0.5 and (i == 0) != unknown_first
        if real:
            canvas.paint(scenes.SHAPE_MASKS[o.shape], o.colour, o.texture, p)
            truths.append(ObjectTruth(o.position, o.shape, o.colour, o.texture, o.size))
        else:
            canvas.paint(outline(kind, rng), o.colour, o.texture, p)
            truths.append(ObjectTruth(o.position, UNKNOWN_SHAPE, o.colour, o.texture, None))
    return canvas.finish(), Truth(kind, scene.background, tuple(truths))


def dataset(
    n: int, seed: int, size: int = 64, kinds: Sequence[str] = KINDS
) -> tuple[np.ndarray, list[Truth]]:
    """n negatives, kinds in turn: ((n, size, size, 3) uint8, truths); image i uses scenes.scene_seed(seed, i)."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    truths = []
    for i in range(n):
        images[i], truth = negative(kinds[i % len(kinds)], scenes.scene_seed(seed, i), size)
        truths.append(truth)
    return images, truths


def blobs_at(positions: Sequence[str], background: str, seed: int, size: int = 64) -> np.ndarray:
    """Random blobs at the given positions (a chance-level picture for composition benchmarks)."""
    rng = np.random.default_rng((seed, 0xB10B))
    canvas = scenes.Canvas.of(background, size)
    for position in positions:
        colour = str(rng.choice([c for c in scenes.COLOURS if scenes.contrasts(c, background)]))
        cx, cy = scenes.CENTRES[position]
        radius = scenes.RADII[str(rng.choice(scenes.SIZES))]
        jx, jy, ja = rng.uniform(-1, 1, 3)
        p = scenes.Placement(cx + jx * scenes.POSITION_JITTER, cy + jy * scenes.POSITION_JITTER, radius, ja)
        canvas.paint(outline(str(rng.choice(OBJECT_KINDS)), rng), colour, "solid", p)
    return canvas.finish()
