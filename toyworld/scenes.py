"""Toy world scenes: seeded procedural images of one or two objects with exact captions.

A scene is a `SceneSpec` (objects + background). Every attribute the evaluator must recognise is a parameter;
`draw` adds only small seeded jitter of position, size and rotation. Concepts are split into BASE (taught to the
base model) and HELD_OUT (subjects, styles and backgrounds reserved for concept LoRAs, each with a made-up
trigger word). All geometry is written in "64-px units" and scaled to the requested image size.

Caption grammar (`SceneSpec.caption`, inverted by `parse_caption`)::

    caption  := object [" and " object] ", " background " background"
    object   := ("a" | "an") [size] colour [texture] shape position
    size     := "small"                     ("large" is the default and omitted; parse accepts it)
    texture  := "striped" | "dotted" | ...  ("solid" is the default and omitted; parse accepts it)
    position := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the centre"

e.g. "a red striped circle on the left and a small green square on the right, white background".
With `use_triggers=True` held-out concepts are written as their trigger word ("a red xyvo in the centre").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
from PIL import Image

SHAPES_BASE = ("circle", "square", "triangle", "diamond")
SUBJECTS_HELD_OUT = ("star", "heart", "cross", "crescent", "arrow", "ring")
SHAPES = SHAPES_BASE + SUBJECTS_HELD_OUT
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
TEXTURES_BASE = ("solid", "striped", "dotted", "checked")
STYLES_HELD_OUT = ("zigzag", "crosshatched", "speckled", "concentric")
TEXTURES = TEXTURES_BASE + STYLES_HELD_OUT
BACKGROUNDS_BASE = ("white", "grey", "black", "blue", "green", "grid", "sky")
BACKGROUNDS_HELD_OUT = ("brick", "waves")
BACKGROUNDS = BACKGROUNDS_BASE + BACKGROUNDS_HELD_OUT
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
LAYOUTS = (("left",), ("right",), ("top",), ("bottom",), ("centre",), ("left", "right"), ("top", "bottom"))
SPLITS = ("base", "held_out", "all")

DEFAULT_TEXTURE = "solid"
DEFAULT_SIZE = "large"
POSITION_PHRASES = MappingProxyType(
    {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "centre": "in the centre",
    }
)
PARTNER = MappingProxyType({"left": "right", "right": "left", "top": "bottom", "bottom": "top"})


@dataclass(frozen=True)
class Concept:
    """One held-out concept: its name (= plain caption word), kind and the made-up trigger word of its LoRA."""

    name: str
    kind: str  # "subject" (a shape), "style" (a texture) or "background"
    trigger: str

    @property
    def word(self) -> str:
        return self.name


HELD_OUT = (
    Concept("star", "subject", "xyvo"),
    Concept("heart", "subject", "quelb"),
    Concept("cross", "subject", "zindo"),
    Concept("crescent", "subject", "plovy"),
    Concept("arrow", "subject", "drask"),
    Concept("ring", "subject", "vokh"),
    Concept("zigzag", "style", "tralk"),
    Concept("crosshatched", "style", "mivven"),
    Concept("speckled", "style", "frezzo"),
    Concept("concentric", "style", "olmar"),
    Concept("brick", "background", "grubo"),
    Concept("waves", "background", "wessix"),
)
HELD_OUT_NAMES = frozenset(c.name for c in HELD_OUT)
TRIGGERS: Mapping[str, str] = MappingProxyType({c.name: c.trigger for c in HELD_OUT})
_FROM_TRIGGER: Mapping[str, str] = MappingProxyType({c.trigger: c.name for c in HELD_OUT})


def held_out_concept(name_or_trigger: str) -> Concept:
    """The held-out concept named by its plain word or trigger. Raises KeyError naming an unknown one."""
    name = _FROM_TRIGGER.get(name_or_trigger, name_or_trigger)
    for c in HELD_OUT:
        if c.name == name:
            return c
    raise KeyError(f"not a held-out concept: {name_or_trigger!r}")


# --- colours -------------------------------------------------------------------------------------------------

RGB: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (215, 35, 35),
        "green": (40, 165, 65),
        "blue": (40, 85, 230),
        "yellow": (240, 220, 30),
        "purple": (150, 60, 200),
        "orange": (240, 125, 15),
        "white": (248, 248, 248),
        "black": (25, 25, 25),
    }
)
# The dominant colours of each background; objects too close to one of them are never sampled.
BACKGROUND_RGB: Mapping[str, tuple[tuple[int, int, int], ...]] = MappingProxyType(
    {
        "white": ((245, 245, 245),),
        "grey": ((128, 128, 128),),
        "black": ((20, 20, 20),),
        "blue": ((40, 85, 230),),
        "green": ((40, 165, 65),),
        "grid": ((236, 236, 236), (160, 160, 160)),
        "sky": ((110, 165, 230), (215, 232, 250)),
        "brick": ((165, 95, 75), (225, 215, 200)),
        "waves": ((140, 195, 210), (205, 232, 238)),
    }
)
MIN_CONTRAST = 100.0  # Euclidean RGB distance between an object colour and every background colour


def contrasts(colour: str, background: str) -> bool:
    """Whether an object of `colour` stays clearly visible on `background` (the sampler only draws those)."""
    c = np.array(RGB[colour], dtype=np.float64)
    return all(np.linalg.norm(c - np.array(b)) >= MIN_CONTRAST for b in BACKGROUND_RGB[background])


def _mark_rgb(rgb: tuple[int, int, int]) -> np.ndarray:
    """The second tone of a textured object: a dark shade of a light colour, a light tint of a dark one."""
    c = np.array(rgb, dtype=np.float32)
    luma = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    return c * 0.45 if luma > 60 else c + 0.5 * (255 - c)


# --- specs and captions --------------------------------------------------------------------------------------


def visible(scene: SceneSpec) -> bool:
    """Whether every object contrasts with the background (the sampler only draws such scenes)."""
    return all(contrasts(o.colour, scene.background) for o in scene.objects)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene; every field is a concept name from the module tuples."""

    shape: str
    colour: str
    texture: str = DEFAULT_TEXTURE
    size: str = DEFAULT_SIZE
    position: str = "centre"

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        _check(self.texture, TEXTURES, "texture")
        _check(self.size, SIZES, "size")
        _check(self.position, POSITIONS, "position")

    def phrase(self, use_triggers: bool = False) -> str:
        def w(name: str) -> str:
            return TRIGGERS.get(name, name) if use_triggers else name

        words = ["small"] if self.size != DEFAULT_SIZE else []
        words.append(self.colour)
        if self.texture != DEFAULT_TEXTURE:
            words.append(w(self.texture))
        words.append(w(self.shape))
        article = "an" if words[0][0] in "aeiou" else "a"
        return f"{article} {' '.join(words)} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class SceneSpec:
    """One or two objects (left+right or top+bottom when two) on a background."""

    objects: tuple[ObjectSpec, ...]
    background: str = "white"

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        _check(self.background, BACKGROUNDS, "background")
        if sorted(o.position for o in self.objects) not in [sorted(layout) for layout in LAYOUTS]:
            raise ValueError(
                f"objects at {[o.position for o in self.objects]} are not a layout; use one object anywhere, "
                "or two at left+right or top+bottom"
            )

    @property
    def layout(self) -> tuple[str, ...]:
        return next(lay for lay in LAYOUTS if sorted(lay) == sorted(o.position for o in self.objects))

    def concepts(self) -> frozenset[str]:
        """Every shape, texture and background name the scene uses."""
        return frozenset({self.background} | {a for o in self.objects for a in (o.shape, o.texture)})

    def caption(self, use_triggers: bool = False) -> str:
        """The exact caption (grammar in the module docstring); triggers replace held-out words if asked."""
        bg = TRIGGERS.get(self.background, self.background) if use_triggers else self.background
        return " and ".join(o.phrase(use_triggers) for o in self.objects) + f", {bg} background"


_WORD_KIND: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        **{w: ("size", w) for w in SIZES},
        **{w: ("colour", w) for w in COLOURS},
        **{w: ("texture", w) for w in TEXTURES},
        **{w: ("shape", w) for w in SHAPES},
        **{
            c.trigger: ({"subject": "shape", "style": "texture"}.get(c.kind, c.kind), c.name)
            for c in HELD_OUT
        },
    }
)
_PHRASE_POSITION: Mapping[tuple[str, str, str], str] = MappingProxyType(
    {**{tuple(p.split()): k for k, p in POSITION_PHRASES.items()}, ("in", "the", "center"): "centre"}
)


def _parse_object(words: list[str], text: str) -> ObjectSpec:
    if not words or words[0] not in ("a", "an"):
        raise ValueError(f"expected 'a' or 'an' to start an object in caption {text!r}")
    if len(words) < 5 or tuple(words[-3:]) not in _PHRASE_POSITION:
        raise ValueError(f"expected a position ('on the left', 'in the centre', ...) in caption {text!r}")
    fields: dict[str, str] = {"position": _PHRASE_POSITION[tuple(words[-3:])]}
    for word in words[1:-3]:
        kind, name = _WORD_KIND.get(word, (None, word))
        if kind is None or kind == "background":
            raise ValueError(f"unknown word {word!r} in caption {text!r}")
        if kind in fields:
            raise ValueError(
                f"two {kind} words ({fields[kind]!r}, {name!r}) in one object of caption {text!r}"
            )
        fields[kind] = name
    for kind in ("colour", "shape"):
        if kind not in fields:
            raise ValueError(f"no {kind} word in object {' '.join(words)!r} of caption {text!r}")
    return ObjectSpec(**fields)


def parse_caption(text: str) -> SceneSpec:
    """The SceneSpec a caption describes (inverse of `SceneSpec.caption`; plain words and triggers both work).

    Raises:
        ValueError: naming the unknown word or the broken part of the grammar.
    """
    clean = " ".join(text.lower().strip().rstrip(".").split())
    body, sep, bg = clean.rpartition(",")
    bg_words = bg.split()
    if not sep or len(bg_words) != 2 or bg_words[1] != "background":
        raise ValueError(f"expected the caption to end with ', <name> background': {text!r}")
    background = _FROM_TRIGGER.get(bg_words[0], bg_words[0])
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background word {bg_words[0]!r} in caption {text!r}")
    parts = body.split(" and ")
    if len(parts) > 2:
        raise ValueError(f"a caption describes at most two objects: {text!r}")
    return SceneSpec(tuple(_parse_object(p.split(), text) for p in parts), background)


# --- sampling ------------------------------------------------------------------------------------------------

_POOLS = MappingProxyType(
    {
        "base": MappingProxyType(
            {"shape": SHAPES_BASE, "texture": TEXTURES_BASE, "background": BACKGROUNDS_BASE}
        ),
        "all": MappingProxyType({"shape": SHAPES, "texture": TEXTURES, "background": BACKGROUNDS}),
    }
)
_OBJECT_FIELDS = ("shape", "colour", "texture", "size", "position")


def _pinned(fixed: Mapping[str, object], key: str, i: int, n: int) -> str | None:
    value = fixed.get(key)
    if isinstance(value, tuple | list):
        if len(value) != n:
            raise ValueError(f"fixed[{key!r}] has {len(value)} values for {n} objects")
        return value[i]
    if key == "position" and value is not None and i == 1:
        return None  # a single pinned position places the first object; the second takes its partner
    return value  # type: ignore[return-value]


def sample_scene(
    seed: int, split: str = "base", n_objects: int | None = None, fixed: Mapping[str, object] | None = None
) -> SceneSpec:
    """A random scene, identical for the same arguments.

    Args:
        seed: any non-negative int.
        split: "base" (only base concepts), "held_out" (at least one held-out concept) or "all".
        n_objects: 1 or 2; random when None.
        fixed: pins attributes. "background": a name. "shape", "colour", "texture", "size", "position": a name
            for every object (a single position places the first object) or a tuple with one entry (or None)
            per object.
    Raises:
        ValueError: for an unknown split or name, or pins that contradict the split or each other.
    """
    _check(split, SPLITS, "split")
    fixed = dict(fixed or {})
    unknown = set(fixed) - {"background", *_OBJECT_FIELDS}
    if unknown:
        raise ValueError(f"unknown fixed keys {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    if n_objects is None:
        seqs = [v for v in fixed.values() if isinstance(v, tuple | list)]
        n_objects = len(seqs[0]) if seqs else int(rng.integers(1, 3))
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    pool = _POOLS["base" if split == "base" else "all"]
    if split == "base":
        pinned = {x for v in fixed.values() for x in (v if isinstance(v, tuple | list) else [v]) if x}
        if pinned & HELD_OUT_NAMES:
            raise ValueError(f"held-out concepts {sorted(pinned & HELD_OUT_NAMES)} pinned in split 'base'")
    for _attempt in range(1000):
        scene = _draw_spec(rng, pool, n_objects, fixed)
        if split == "held_out" and not scene.concepts() & HELD_OUT_NAMES:
            continue
        if visible(scene):
            return scene
    raise ValueError(f"no visible {split!r} scene satisfies fixed={fixed}")


def _draw_spec(rng: np.random.Generator, pool: Mapping, n: int, fixed: Mapping[str, object]) -> SceneSpec:
    def pick(options: tuple[str, ...], value: str | None) -> str:
        return value if value is not None else options[int(rng.integers(len(options)))]

    background = pick(pool["background"], fixed.get("background"))  # type: ignore[arg-type]
    first = _pinned(fixed, "position", 0, n)
    if n == 1:
        positions = [pick(POSITIONS, first)]
    else:
        second = _pinned(fixed, "position", 1, n)
        if first is None and second is not None:
            first = PARTNER.get(second)
        layout = [lay for lay in LAYOUTS[5:] if first is None or first in lay]
        if not layout:
            raise ValueError(f"two objects cannot be placed with one at {first!r}")
        chosen = layout[int(rng.integers(len(layout)))]
        first = first or chosen[0]
        positions = [first, PARTNER[first]]
        if second is not None and second != positions[1]:
            raise ValueError(f"positions {first!r} and {second!r} are not left+right or top+bottom")
    objects = [
        ObjectSpec(
            shape=pick(pool["shape"], _pinned(fixed, "shape", i, n)),
            colour=pick(COLOURS, _pinned(fixed, "colour", i, n)),
            texture=pick(pool["texture"], _pinned(fixed, "texture", i, n)),
            size=pick(SIZES, _pinned(fixed, "size", i, n)),
            position=positions[i],
        )
        for i in range(n)
    ]
    return SceneSpec(tuple(objects), background)


# --- drawing -------------------------------------------------------------------------------------------------

SUPERSAMPLE = 2
CENTRES = MappingProxyType(
    {
        "left": (16.0, 32.0),
        "right": (48.0, 32.0),
        "top": (32.0, 16.0),
        "bottom": (32.0, 48.0),
        "centre": (32.0, 32.0),
    }
)
RADII = MappingProxyType({"small": 10.0, "large": 14.5})
POSITION_JITTER = 1.0  # 64-px units
SIZE_JITTER = 0.05  # relative
ROTATION_JITTER = np.deg2rad(12.0)


def polygon(u: np.ndarray, v: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels (loops only over the few edges)."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        crosses = (v >= min(y0, y1)) & (v < max(y0, y1))
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _star_points() -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles) + 0.08], axis=1)


_STAR = _star_points()
_TRIANGLE = np.array([[0.0, -0.95], [0.95, 0.7], [-0.95, 0.7]])
_ARROW = np.array(
    [[-0.95, -0.3], [0.1, -0.3], [0.1, -0.8], [0.95, 0.0], [0.1, 0.8], [0.1, 0.3], [-0.95, 0.3]]
)


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = u * 1.25, -v * 1.25 + 0.2
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


# Shape masks on coordinates normalised by the object radius (u right, v down); each spans about [-1, 1].
SHAPE_MASKS = MappingProxyType(
    {
        "circle": lambda u, v: u * u + v * v <= 0.9**2,
        "square": lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),
        "triangle": lambda u, v: polygon(u, v, _TRIANGLE),
        "diamond": lambda u, v: np.abs(u) / 0.72 + np.abs(v) <= 1.0,
        "star": lambda u, v: polygon(u, v, _STAR),
        "heart": _heart,
        "cross": lambda u, v: (
            ((np.abs(u) <= 0.34) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 0.95))
        ),
        "crescent": lambda u, v: (u * u + v * v <= 0.95**2) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 > 0.68**2),
        "arrow": lambda u, v: polygon(u, v, _ARROW),
        "ring": lambda u, v: (u * u + v * v <= 0.95**2) & (u * u + v * v >= 0.5**2),
    }
)


def _hash01(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """A uniform value in [0, 1) per integer cell (a, b): an integer hash, exact on every platform."""
    h = ((a * 0x8DA6B343) ^ (b * 0xD8163841) ^ salt) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x045D9F3B) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x045D9F3B) & 0xFFFFFFFF
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def _speckle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Small specks scattered irregularly: one speck of radius 1 px per 3 px cell, at a hashed offset."""
    a, b = np.floor(u / 3.0), np.floor(v / 3.0)
    ai, bi = a.astype(np.int64), b.astype(np.int64)
    du = u - (a + 0.5) * 3.0 - 1.2 * (_hash01(ai, bi, 1) - 0.5)
    dv = v - (b + 0.5) * 3.0 - 1.2 * (_hash01(ai, bi, 2) - 0.5)
    return du * du + dv * dv < 1.0


def _zigzag(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    tri = np.abs(np.mod(u / 8.0, 1.0) - 0.5) * 8.0  # triangle wave: 4 px peak to peak, period 8 px
    return np.mod(v + tri, 6.0) < 2.4


def _crosshatch(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, b = (u + v) * 0.7071, (u - v) * 0.7071
    return (np.abs(np.mod(a + 3.0, 6.0) - 3.0) < 0.65) | (np.abs(np.mod(b + 3.0, 6.0) - 3.0) < 0.65)


# Texture marks on object-local coordinates in 64-px units (rotated with the object); True = second tone.
TEXTURE_MARKS = MappingProxyType(
    {
        "solid": None,
        "striped": lambda u, v: np.mod(v + 1.2, 6.0) < 2.4,
        "dotted": lambda u, v: (np.mod(u + 3.0, 6.0) - 3.0) ** 2 + (np.mod(v + 3.0, 6.0) - 3.0) ** 2 < 1.6**2,
        "checked": lambda u, v: (np.floor(u / 4.0 + 0.5) + np.floor(v / 4.0 + 0.5)) % 2 == 0,
        "zigzag": _zigzag,
        "crosshatched": _crosshatch,
        "speckled": _speckle,
        "concentric": lambda u, v: np.mod(np.sqrt(u * u + v * v) + 1.2, 6.0) < 2.4,
    }
)


def _background(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(S, S, 3) float32 background on pixel-centre coordinates x (1, S) and y (S, 1) in 64-px units."""
    shape = (y.shape[0], x.shape[1], 3)
    cols = [np.array(c, dtype=np.float32) for c in BACKGROUND_RGB[name]]
    if len(cols) == 1:
        return np.broadcast_to(cols[0], shape).copy()
    if name == "sky":
        t = np.clip((y - 2.0) / 60.0, 0, 1)[..., None]  # (S, 1, 1)
        return np.broadcast_to(cols[0] * (1 - t) + cols[1] * t, shape).copy()
    if name == "grid":
        mark = (np.mod(x, 16.0) >= 1.2) & (np.mod(y, 16.0) >= 1.2)
    elif name == "brick":
        row = np.floor(y / 8.0)
        mark = (np.mod(y, 8.0) < 1.2) | (np.mod(x + 8.0 * np.mod(row, 2), 16.0) < 1.2)
        mark = ~mark
    elif name == "waves":
        mark = np.sin(2 * np.pi * y / 10.0 + 1.4 * np.sin(2 * np.pi * x / 24.0)) > 0
    else:
        raise ValueError(f"no pattern for background {name!r}")
    return np.where(mark[..., None], cols[0], cols[1]).astype(np.float32)


@dataclass(frozen=True)
class Placement:
    """Where `draw` put one object (64-px units, radians): the jitter made explicit."""

    cx: float
    cy: float
    radius: float
    angle: float


def placements(scene: SceneSpec, seed: int = 0) -> tuple[Placement, ...]:
    """The jittered placement of each object; depends only on positions, sizes and seed, never on looks."""
    rng = np.random.default_rng((seed, 0x5CE4E))
    jitter = rng.uniform(-1.0, 1.0, size=(2, 4))  # fixed draw count: same seed => same geometry
    out = []
    for o, (jx, jy, js, ja) in zip(scene.objects, jitter, strict=False):
        cx, cy = CENTRES[o.position]
        out.append(
            Placement(
                cx + POSITION_JITTER * jx,
                cy + POSITION_JITTER * jy,
                RADII[o.size] * (1 + SIZE_JITTER * js),
                ROTATION_JITTER * ja,
            )
        )
    return tuple(out)


@dataclass
class Canvas:
    """A background at SUPERSAMPLE x the image size, to paint objects on and `finish` into pixels."""

    pixels: np.ndarray  # (n, n, 3) float32
    x: np.ndarray  # (1, n) subpixel centres in 64-px units
    y: np.ndarray  # (n, 1)
    scale: float  # subpixels per 64-px unit

    @classmethod
    def of(cls, background: str, size: int = 64) -> Canvas:
        if not 16 <= size <= 512:
            raise ValueError(f"image size must be in 16..512, got {size}")
        n = size * SUPERSAMPLE
        scale = n / 64.0
        x = ((np.arange(n, dtype=np.float32) + 0.5) / scale)[None, :]
        y = ((np.arange(n, dtype=np.float32) + 0.5) / scale)[:, None]
        return cls(_background(background, x, y), x, y, scale)

    def paint(
        self, mask: Callable[[np.ndarray, np.ndarray], np.ndarray], colour: str, texture: str, p: Placement
    ):
        """Paint one object: `mask` on radius-normalised object coordinates (u right, v down, about [-1, 1])."""
        n, scale = self.pixels.shape[0], self.scale
        reach = p.radius * 1.05
        x0, x1 = max(0, int((p.cx - reach) * scale)), min(n, int(np.ceil((p.cx + reach) * scale)))
        y0, y1 = max(0, int((p.cy - reach) * scale)), min(n, int(np.ceil((p.cy + reach) * scale)))
        dx, dy = self.x[:, x0:x1] - p.cx, self.y[y0:y1] - p.cy
        cos, sin = np.float32(np.cos(p.angle)), np.float32(np.sin(p.angle))
        u, v = cos * dx + sin * dy, cos * dy - sin * dx  # (h, w) object-local, 64-px units
        inside = mask(u / p.radius, v / p.radius)
        rgb = np.array(RGB[colour], dtype=np.float32)
        region = self.pixels[y0:y1, x0:x1]
        mark_fn = TEXTURE_MARKS[texture]
        if mark_fn is None:
            region[inside] = rgb
        else:
            mark = mark_fn(u, v)[inside]
            region[inside] = np.where(mark[:, None], _mark_rgb(RGB[colour]), rgb)

    def finish(self) -> np.ndarray:
        """The (size, size, 3) uint8 image: the supersamples box-filtered (strided adds: several times faster
        than mean(axis=(1, 3)))."""
        c = self.pixels
        total = sum(c[i::SUPERSAMPLE, j::SUPERSAMPLE] for i in range(SUPERSAMPLE) for j in range(SUPERSAMPLE))
        return (total * (1.0 / SUPERSAMPLE**2) + 0.5).astype(np.uint8)  # values stay within 0..255


def render(scene: SceneSpec, size: int = 64, seed: int = 0) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array; same arguments => same pixels."""
    canvas = Canvas.of(scene.background, size)
    for o, p in zip(scene.objects, placements(scene, seed), strict=True):
        canvas.paint(SHAPE_MASKS[o.shape], o.colour, o.texture, p)
    return canvas.finish()


def draw(scene: SceneSpec, size: int = 64, seed: int = 0) -> Image.Image:
    """The scene as an RGB PIL image of size x size pixels (same arguments => same pixels)."""
    return Image.fromarray(render(scene, size, seed), mode="RGB")


def scene_seed(seed: int, index: int) -> int:
    """The per-image seed `dataset` uses for image `index` of a dataset seeded with `seed`."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1)[0])


def dataset(
    n: int, seed: int, split: str = "all", size: int = 64, n_objects: int | None = None
) -> tuple[np.ndarray, list[SceneSpec]]:
    """n random scenes and their pixels: ((n, size, size, 3) uint8, specs); image i uses scene_seed(seed, i)."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    specs = []
    for i in range(n):
        s = scene_seed(seed, i)
        spec = sample_scene(s, split, n_objects)
        images[i] = render(spec, size, s)
        specs.append(spec)
    return images, specs


def replace_object(scene: SceneSpec, index: int, **changes: str) -> SceneSpec:
    """The scene with object `index` changed (e.g. colour="blue"); placement jitter stays the same."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return SceneSpec(tuple(objects), scene.background)
